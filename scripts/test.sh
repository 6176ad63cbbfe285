#!/usr/bin/env bash
# The whole test suite: every test starts its own redis-server (and, for mail, its own
# SMTP server) on free ports; nothing touches a Redis you already run.
# cargo test runs first: it builds target/debug/satchel, which the Node and Python
# suites start (SATCHEL_BIN overrides the binary they use).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --all-targets "$@"

# The client suites need their dependencies (.ci/run installs them; so does this, once).
for dir in clients/node examples/exam-service; do
  [ -d "$dir/node_modules" ] || (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
done

echo "== node --test: clients/node"
(cd clients/node && node --test test/*.test.js)
echo "== node --test: examples/exam-service"
(cd examples/exam-service && node --test test/*.test.js)
echo "== pytest: clients/python"
(cd clients/python && python3 -m pytest -q)

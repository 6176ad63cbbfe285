#!/usr/bin/env bash
# The whole test suite: every test starts its own redis-server (and, for mail, its own
# SMTP server) on free ports; nothing touches a Redis you already run.
# cargo test runs first: it builds target/debug/satchel, which the Node and Python
# suites start (SATCHEL_BIN overrides the binary they use).
#
# On a fresh machine it needs Rust, redis-server, Node.js >= 20 with npm, and
# python3; it installs the Node packages (npm ci) and the Python packages
# (scripts/test-requirements.txt, into target/test-venv) itself.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v python3 >/dev/null || missing+=(python3)
[ -x /usr/sbin/postfix ] || missing+=(postfix)
if [ ${#missing[@]} -gt 0 ]; then
  echo "scripts/test.sh: missing ${missing[*]}; install with:" >&2
  echo "  sudo apt-get install ${missing[*]}" >&2
  exit 1
fi

# Python test dependencies: the system's if it has them all, else a venv of our own
# (Debian's python3 refuses system-wide pip installs).
if ! python3 -c 'import aiosmtpd, msgpack, pytest, dkim, nacl' 2>/dev/null; then
  venv=target/test-venv
  if [ ! -x "$venv/bin/python3" ]; then
    echo "== creating $venv for the Python test dependencies"
    mkdir -p target
    if ! python3 -m venv "$venv"; then
      rm -rf "$venv"
      echo "scripts/test.sh: python3 cannot create a venv; install with:" >&2
      echo "  sudo apt-get install python3-venv" >&2
      exit 1
    fi
  fi
  if ! "$venv/bin/python3" -c 'import aiosmtpd, msgpack, pytest, dkim, nacl' 2>/dev/null; then
    echo "== pip install -r scripts/test-requirements.txt (into $venv)"
    "$venv/bin/python3" -m pip install -q --disable-pip-version-check -r scripts/test-requirements.txt
  fi
  # First on PATH, so the Rust tests' SMTP sink (python3 tests/smtp_sink.py) uses it too.
  export PATH="$PWD/$venv/bin:$PATH"
fi

# The examples as programs: tests/embedded.rs and the Node suite run
# target/debug/examples/embedded (cargo test --all-targets compiles examples but does
# not leave them there).
cargo build --examples
cargo test --all-targets "$@"

for dir in clients/node examples/exam-service; do
  [ -d "$dir/node_modules" ] || (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
done

echo "== node --test: clients/node"
(cd clients/node && node --test test/*.test.js)
echo "== node --test: examples/exam-service"
(cd examples/exam-service && node --test test/*.test.js)
echo "== pytest: clients/python"
(cd clients/python && python3 -m pytest -q)

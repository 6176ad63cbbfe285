#!/usr/bin/env bash
# The whole test suite: every test starts its own redis-server (and, for mail, its own
# SMTP server) on free ports; nothing touches a Redis you already run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --all-targets "$@"

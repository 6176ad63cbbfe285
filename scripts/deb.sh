#!/usr/bin/env bash
# Builds target/debian/satchel_<version>-1_<arch>.deb with cargo-deb: the release
# binary in /usr/bin, the units in /lib/systemd/system, the example config as the
# conffile /etc/satchel/satchel.toml, man pages and bash/zsh/fish completions (made by
# the binary itself: `satchel generate`). Extra arguments go to cargo deb.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-deb >/dev/null; then
  echo "scripts/deb.sh needs cargo-deb: cargo install cargo-deb --locked" >&2
  exit 1
fi
cargo build --release --bin satchel
rm -rf target/assets
target/release/satchel generate man target/assets/man
gzip -9n target/assets/man/*.1
target/release/satchel generate completions target/assets/completions
cargo deb --no-build "$@"

#!/usr/bin/env bash
# Checks the package scripts/deb.sh built: its contents and conffiles (dpkg-deb),
# lintian's verdict, and a real `dpkg -i` into a throwaway root: an overlay of / in a
# private mount namespace, so this machine's own system is never touched. There the
# maintainer scripts run, and the installed `satchel --version` and `satchel
# check-config` must work. Run as root (CI is).
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(ls target/debian/satchel_*.deb | tail -n 1)
echo "== contents of $deb"
listing=$(dpkg-deb -c "$deb")
for path in ./usr/bin/satchel ./usr/lib/systemd/system/satchel.service \
  ./usr/lib/systemd/system/satchel.socket ./etc/satchel/satchel.toml \
  ./usr/share/man/man1/satchel.1.gz ./usr/share/man/man1/satchel-mail-send.1.gz \
  ./usr/share/bash-completion/completions/satchel ./usr/share/zsh/vendor-completions/_satchel \
  ./usr/share/fish/vendor_completions.d/satchel.fish ./usr/share/doc/satchel/copyright; do
  grep -q " $path\$" <<<"$listing" || { echo "missing from the package: $path" >&2; exit 1; }
done
dpkg-deb -I "$deb" conffiles | grep -qx /etc/satchel/satchel.toml \
  || { echo "/etc/satchel/satchel.toml is not a conffile" >&2; exit 1; }
echo "ok: $(grep -c . <<<"$listing") entries, /etc/satchel/satchel.toml a conffile"

if command -v lintian >/dev/null; then
  echo "== lintian"
  # Errors fail; the tags below are explained in README.md ("Install on Debian/Ubuntu").
  lintian --fail-on error --suppress-tags-from-file scripts/lintian-overrides.txt "$deb"
fi

echo "== dpkg -i into a throwaway root"
root=$(mktemp -d)
cp "$deb" "$root/satchel.deb"
unshare --mount --fork bash -euo pipefail -c "
  mount --make-rprivate /
  mount -t tmpfs tmpfs '$root'
  mkdir '$root/upper' '$root/work' '$root/merged'
  mount -t overlay overlay -o lowerdir=/,upperdir='$root/upper',workdir='$root/work' '$root/merged'
  mount --rbind /dev '$root/merged/dev'
  mount -t proc proc '$root/merged/proc'
  mount -t tmpfs tmpfs '$root/merged/run'
  cp '$deb' '$root/merged/tmp/satchel.deb'
  chroot '$root/merged' dpkg -i /tmp/satchel.deb
  chroot '$root/merged' getent group satchel
  chroot '$root/merged' satchel --version
  chroot '$root/merged' satchel check-config --config /etc/satchel/satchel.toml >/dev/null
  grep -q '^ExecStart=/usr/bin/satchel ' '$root/merged/usr/lib/systemd/system/satchel.service'
  chroot '$root/merged' dpkg -r satchel
  test ! -e '$root/merged/usr/bin/satchel'
"
rm -rf "$root"
echo "ok: installed, ran satchel --version and check-config, removed"

#!/usr/bin/env bash
# Re-record tests/data/sys-loop: the sysfs files hostfs.read_loop_devices reads,
# copied from this machine's /sys while one loop device is bound (read-only)
# and another exists unbound. Run as root; leaves nothing behind.
set -euo pipefail
out=$(cd "$(dirname "$0")" && pwd)/sys-loop
tmp=$(mktemp -d); L=; trap '[[ -n $L ]] && losetup -d "$L"; rm -rf "$tmp"' EXIT
truncate -s 16M "$tmp/backing file"
L=$(losetup --find --show --read-only --direct-io=on "$tmp/backing file")
# a second one, bound and released again, so it exists unbound
U=$(losetup --find --show "$tmp/backing file"); losetup -d "$U"
rm -rf "$out"; mkdir -p "$out/block"
for d in "${L#/dev/}" "${U#/dev/}"; do
    src=/sys/block/$d; dst=$out/block/$d
    mkdir -p "$dst/holders"
    for f in dev ro size; do cat "$src/$f" > "$dst/$f"; done
    if [[ -d $src/loop ]]; then
        mkdir -p "$dst/loop"
        for f in backing_file autoclear dio offset sizelimit; do cat "$src/loop/$f" > "$dst/loop/$f"; done
    fi
done
echo "recorded $L (bound) and $U (unbound) into $out"

#!/usr/bin/env bash
# The same steps as `cephvol attach`/`detach` on the fuse backend, done by the
# bare tools with no checks: the baseline cephvol is compared with.
#   bare.sh attach CONF POOL IMAGE FUSEDIR MOUNTPOINT   -> prints the loop device
#   bare.sh detach FUSEDIR MOUNTPOINT LOOPDEV
set -euo pipefail
case $1 in
attach)
    conf=$2 pool=$3 image=$4 fdir=$5 mnt=$6
    mkdir -p "$fdir" "$mnt"
    rbd-fuse -c "$conf" -p "$pool" -r "$image" "$fdir"
    dev=$(losetup --find --show --direct-io=on "$fdir/$image")
    mount -t ext4 "$dev" "$mnt"
    echo "$dev" ;;
detach)
    fdir=$2 mnt=$3 dev=$4
    sync --file-system "$mnt"
    umount "$mnt"
    blockdev --flushbufs "$dev"
    losetup -d "$dev"
    fusermount3 -u "$fdir"
    # as cephvol does: rbd-fuse has flushed librbd's cache only once it exits
    while pgrep -f "^rbd-fuse .* $fdir\$" >/dev/null; do sleep 0.01; done ;;
esac

#!/usr/bin/env bash
# The same steps as `cephvol attach`/`detach` on the fuse and qsd backends, done
# by the bare tools with no checks: the baseline cephvol is compared with.
#   bare.sh attach CONF POOL IMAGE FUSEDIR MOUNTPOINT       -> prints the loop device
#   bare.sh detach FUSEDIR MOUNTPOINT LOOPDEV
#   bare.sh attach-qsd CONF POOL IMAGE QSDDIR MOUNTPOINT    -> prints the loop device
#   bare.sh detach-qsd QSDDIR MOUNTPOINT LOOPDEV
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
attach-qsd)
    # the daemon as cephvol starts it (rbd driver, librbd cache off, FUSE export)
    conf=$2 pool=$3 image=$4 qdir=$5 mnt=$6
    mkdir -p "$qdir" "$mnt"
    : > "$qdir/image"
    qemu-storage-daemon \
        --blockdev "{\"driver\":\"rbd\",\"node-name\":\"rbd0\",\"pool\":\"$pool\",\"image\":\"$image\",\"conf\":\"$conf\",\"cache\":{\"direct\":true,\"no-flush\":false},\"discard\":\"unmap\"}" \
        --export "{\"type\":\"fuse\",\"id\":\"fuse0\",\"node-name\":\"rbd0\",\"mountpoint\":\"$qdir/image\",\"writable\":true}" \
        --pidfile "$qdir/pid" --daemonize
    dev=$(losetup --find --show --direct-io=on "$qdir/image")
    mount -t ext4 "$dev" "$mnt"
    echo "$dev" ;;
detach-qsd)
    qdir=$2 mnt=$3 dev=$4
    sync --file-system "$mnt"
    umount "$mnt"
    blockdev --flushbufs "$dev"
    losetup -d "$dev"
    pid=$(cat "$qdir/pid")
    kill "$pid"
    # it flushes and closes the image as it exits (a zombie counts as gone)
    while [[ -r /proc/$pid/stat ]] && [[ $(cut -d' ' -f3 "/proc/$pid/stat") != Z ]]; do
        sleep 0.01
    done ;;
esac

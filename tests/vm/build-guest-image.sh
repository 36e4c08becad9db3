#!/usr/bin/env bash
# Build the qemu test guest from Debian's packages only:
#   OUT/rootfs.img  ext4 root: debootstrap (minbase) + vagrant/provision/guest-packages.txt
#                   + tests/vm/container-packages.txt (Podman, runc, Docker: configured
#                   for an offline test host, not started at boot),
#                   + Debian's kernel modules, systemd as PID 1, systemd-networkd
#                   (10.99.0.2/24 on the virtio NIC), the command agent
#   OUT/vmlinuz     Debian's kernel (the one linux-image-amd64 depends on)
#   OUT/initrd.img  busybox + virtio/ext4 modules; mounts /dev/vda, switch_root
# cephvol itself is not baked in (the image's cache key does not cover its code): the
# harness hands every boot a second disk with the working tree's Debian package and
# vagrant/provision/ (harness.install_tree), mounted at /opt/cephvol-src, and
# install-cephvol.sh installs the package from there with dpkg (its Depends are in
# guest-packages.txt) before the command agent starts.
# Usage: build-guest-image.sh OUT   (run as root; builds in OUT.build, then renames)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
prov=$here/../../vagrant/provision
out=$1
build=$out.build
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
rm -rf "$build"; mkdir -p "$build"
trap 'rm -rf "$build"' EXIT
root=$build/root

pkgs=$(cat "$prov/guest-packages.txt" "$here/container-packages.txt" | grep -v -e '^#' -e '^$' \
       | paste -sd, -)
debootstrap --variant=minbase --include="$pkgs" bookworm "$root" "$mirror" >"$build/debootstrap.log" 2>&1 \
    || { tail -20 "$build/debootstrap.log" >&2; exit 1; }

kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
kver=${kpkg#linux-image-}
(cd "$build" && apt-get download -q "$kpkg" >/dev/null)
# not `dpkg -x` into the root: it would replace the merged-/usr /lib symlink
dpkg -x "$build"/linux-image-*.deb "$build/kernel"
mkdir -p "$root/usr/lib/modules"
cp -a "$build/kernel/lib/modules/$kver" "$root/usr/lib/modules/"
depmod -b "$root" "$kver"
cp "$build/kernel/boot/vmlinuz-$kver" "$build/vmlinuz"
rm -rf "$build/kernel"

# --- the root filesystem's own configuration
echo cephvol-guest > "$root/etc/hostname"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n/dev/vdb /opt/cephvol-src ext4 ro,nofail 0 0\n' \
    > "$root/etc/fstab"
mkdir -p "$root/opt/cephvol-src"
printf 'virtio_console\nvirtio_net\nrbd\nnbd\nloop\nfuse\ndm_mod\ndm_crypt\n' > "$root/etc/modules-load.d/cephvol.conf"
cat > "$root/etc/systemd/network/10-test.network" <<'NET'
[Match]
Type=ether
[Network]
Address=10.99.0.2/24
LinkLocalAddressing=no
IPv6AcceptRA=no
NET
ln -sf /lib/systemd/system/systemd-networkd.service \
    "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
install -m 755 "$here/guest-agent.py" "$root/usr/local/sbin/cephvol-guest-agent"
cat > "$root/etc/systemd/system/cephvol-guest-agent.service" <<'UNIT'
[Unit]
Description=cephvol test harness command agent
# the qemu guest only: an nspawn host boots this image too, where the agent's
# device never appears and its install would run again ~90 s after boot (the
# device job's timeout), replacing cephvol under a running test
ConditionVirtualization=!container
RequiresMountsFor=/opt/cephvol-src
Wants=systemd-networkd.service dev-virtio\x2dports-cephvol.agent.device
After=systemd-networkd.service systemd-modules-load.service dev-virtio\x2dports-cephvol.agent.device
[Service]
StandardOutput=journal+console
StandardError=journal+console
# dpkg -i (byte-compiling, the postinst starting cephvol-cleanup.service) under TCG
TimeoutStartSec=240
ExecStartPre=/bin/sh /opt/cephvol-src/vagrant/provision/install-cephvol.sh --offline /opt/cephvol-src/cephvol.deb
ExecStart=/usr/local/sbin/cephvol-guest-agent
Restart=on-failure
[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/cephvol-guest-agent.service \
    "$root/etc/systemd/system/multi-user.target.wants/cephvol-guest-agent.service"
# nothing waits for a login on a test guest
ln -sf /dev/null "$root/etc/systemd/system/getty@.service"
ln -sf /dev/null "$root/etc/systemd/system/serial-getty@.service"
ln -sf /dev/null "$root/etc/systemd/system/getty-static.service"
rm -f "$root/etc/machine-id"; : > "$root/etc/machine-id"  # a new id per guest boot

# --- container engines: offline, no host firewall or bridge, started only on demand
# (a unit's Requires=docker.service, or a test): nothing of them runs at boot
find "$root/etc/systemd/system" -path '*.wants/*' \( -name 'docker.*' -o -name 'containerd.*' \
    -o -name 'podman*' \) -delete
mkdir -p "$root/etc/containers" "$root/etc/systemd/system/docker.service.d"
# crun fails here (setrlimit, hybrid cgroups): runc; no inherited ulimits, no pids
# limit (the nspawn host has none to give); no network unless a test makes one, and
# netavark rather than CNI, whose plugins are not installed (a warning on every call)
cat > "$root/etc/containers/containers.conf" <<'CONF'
[containers]
default_ulimits = []
pids_limit = 0
netns = "none"
[engine]
runtime = "runc"
[network]
network_backend = "netavark"
CONF
cat > "$root/etc/systemd/system/docker.service.d/cephvol-test.conf" <<'UNIT'
# never touch a firewall, forwarding or a bridge: containers get only a loopback
# (/proc/sys is read-only under nspawn anyway); systemd manages the cgroups
[Service]
ExecStart=
ExecStart=/usr/sbin/dockerd -H fd:// --containerd=/run/containerd/containerd.sock --iptables=false --ip6tables=false --bridge=none --ip-forward=false --ip-masq=false --exec-opt native.cgroupdriver=systemd
UNIT
rm -rf "$root/var/cache/apt/archives/"*.deb

# --- initramfs: busybox, the modules to reach an ext4 root on virtio, switch_root
ird=$build/initrd
mkdir -p "$ird/bin" "$ird/lib/modules" "$ird/newroot" "$ird/proc" "$ird/sys" "$ird/dev"
cp /bin/busybox "$ird/bin/busybox"
# (modprobe takes one module per call; crc32c_generic is only a soft
# dependency of ext4/jbd2, so it is named explicitly)
for mod in virtio_pci virtio_blk crc32c_generic ext4; do  # crc32c-intel may fail: harmless
    modprobe -d "$root" -S "$kver" --show-depends "$mod" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
    cp "$ko" "$ird/lib/modules/"
    echo "/lib/modules/$(basename "$ko")" >> "$ird/modules.order"
done
cat > "$ird/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in $(/bin/busybox cat /modules.order); do /bin/busybox insmod "$m"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do /bin/busybox sleep 0.05; i=$((i+1)); done
/bin/busybox mount -t ext4 -o rw /dev/vda /newroot || { echo "initrd: cannot mount /dev/vda"; /bin/busybox poweroff -f; }
/bin/busybox umount /proc /sys /dev
exec /bin/busybox switch_root /newroot /sbin/init
INIT
chmod 755 "$ird/init"
(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) > "$build/initrd.img"

# --- the disk image (no loop mount needed: mke2fs copies the tree)
size_mb=$(( $(du -sm "$root" | cut -f1) + 1024 ))
mke2fs -q -t ext4 -L cvroot -d "$root" "$build/rootfs.img" "${size_mb}M"

rm -rf "$out"; mkdir -p "$out"
mv "$build/rootfs.img" "$build/vmlinuz" "$build/initrd.img" "$out/"
echo "$kver" > "$out/kernel-version"
echo "built $out ($kver)"

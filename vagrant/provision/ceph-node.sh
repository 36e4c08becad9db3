#!/bin/sh
# Vagrant Ceph node: the repository's own set-up (scripts/setup: Debian's Ceph
# packages, the venv, cephvol) and the same dev cluster the tests start, bound
# to the lab's private address. Its config and keyring are served to the
# container hosts over the private network only (port 8765, plain HTTP: a lab).
set -eu
addr=${1:?usage: ceph-node.sh ADDRESS}
cd /cephvol
./scripts/setup
.venv/bin/cephvol dev-cluster up --dir /var/lib/cephvol-lab --addr "$addr" --expose
lab=/var/lib/cephvol-lab
mkdir -p $lab/share
# a client-only config (the node's own names local log and socket paths) and
# only client.admin's key (never the mon. key)
{ echo "[global]"; grep -E '^(fsid|mon host) =' $lab/ceph.conf
  printf '[client]\nkeyring = /etc/ceph/keyring\n'; } > $lab/share/ceph.conf
ceph -c $lab/ceph.conf auth get client.admin > $lab/share/keyring
chmod 600 $lab/share/keyring
cat > /etc/systemd/system/cephvol-lab-share.service <<UNIT
[Unit]
Description=cephvol lab: serve ceph.conf and keyring to the container hosts
[Service]
ExecStart=/usr/bin/python3 -m http.server --bind $addr --directory /var/lib/cephvol-lab/share 8765
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now cephvol-lab-share.service

#!/bin/sh
# Provision a Debian 12 container host for cephvol (Vagrant): the same package
# list the qemu harness bakes into its guest image, then cephvol itself.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends $(grep -v '^#' "$here/guest-packages.txt")
sh "$here/install-cephvol.sh" "${1:-$here/../..}"

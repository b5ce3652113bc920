#!/usr/bin/env bash
# Fetches Cocoon's own QEMU into PREFIX without touching the system's: the backports release
# of this Debian (bookworm-backports' QEMU 10 on Debian 12, whose own is 7.2), unpacked by
# fetch-debian.sh. QEMU finds its modules and data relative to its binary, so it runs from
# PREFIX beside the system's QEMU. Pods need 8.2 or later to map the VM template's RAM
# copy-on-write from a file they can't write (vmm-driver/src/qemu/version.rs).
#
#   scripts/fetch-qemu.sh PREFIX    (QEMU_SUITE overrides the suite, default <codename>-backports)
set -euo pipefail

prefix=${1:?usage: fetch-qemu.sh PREFIX}
. /etc/os-release
"$(dirname "$0")/fetch-debian.sh" "${QEMU_SUITE:-${VERSION_CODENAME:?}-backports}" "$prefix" \
  usr/bin/qemu-system-x86_64 qemu-system-x86 qemu-system-common qemu-system-data
"$prefix/usr/bin/qemu-system-x86_64" -version >&2

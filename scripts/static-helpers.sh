#!/bin/sh
# Builds virtiofsd and vhost-device-vsock as static binaries for the deploy image (issue #32):
# the image has no userland and a node's libraries are its own, so the helpers it carries link
# glibc, libseccomp and libcap-ng in. Same versions as `make helpers` installs on this host.
# Cached: a helper already built in DIR is kept.
set -eu
# ldd says "statically linked" (static-pie) or "not a dynamic executable" of a static binary.
is_static() { ldd "$1" 2>&1 | grep -qE 'statically linked|not a dynamic executable'; }
DIR=${1:?usage: static-helpers.sh DIR}
TARGET=${TARGET:-x86_64-unknown-linux-gnu}
mkdir -p "$DIR"
for h in virtiofsd@1.14.0 vhost-device-vsock@0.3.0; do
  name=${h%@*}
  if [ -x "$DIR/bin/$name" ] && is_static "$DIR/bin/$name"; then
    echo "$name: static build cached in $DIR/bin"
    continue
  fi
  echo "cargo install $h (static)"
  LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
  LIBCAPNG_LINK_TYPE=static LIBCAPNG_LIB_PATH=/usr/lib/x86_64-linux-gnu \
  RUSTFLAGS="-C target-feature=+crt-static" \
    cargo install --locked --force --root "$DIR" --target "$TARGET" "$h"
  if ! is_static "$DIR/bin/$name"; then
    echo "$name is not static: $(ldd "$DIR/bin/$name" 2>&1)" >&2
    exit 1
  fi
done

#!/usr/bin/env bash
# Fetches a dockerd that can name a shim v2 runtime (>= 23) for the Docker tests and the
# bench, without installing anything system-wide: Debian 13's docker.io, docker-cli and tini
# (they run on Debian 12: libc6 >= 2.34, containerd, runc), unpacked into PREFIX by
# fetch-debian.sh. A PREFIX that has dockerd is kept.
#
#   scripts/fetch-docker.sh PREFIX        (DOCKER_SUITE overrides the suite, default trixie)
set -euo pipefail

prefix=${1:?usage: fetch-docker.sh PREFIX}
"$(dirname "$0")/fetch-debian.sh" "${DOCKER_SUITE:-trixie}" "$prefix" usr/sbin/dockerd \
  docker.io docker-cli tini
"$prefix/usr/sbin/dockerd" --version >&2

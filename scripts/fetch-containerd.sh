#!/usr/bin/env bash
# Fetches another containerd release for the test matrix, without installing anything
# system-wide: Debian sid's containerd (2.x; it runs on Debian 12, whose own is 1.6), unpacked
# into PREFIX by fetch-debian.sh. The suites then run against it with
# COCOON_TEST_CONTAINERD_BIN=PREFIX/usr/bin (`make test-containerd2`).
#
#   scripts/fetch-containerd.sh PREFIX    (CONTAINERD_SUITE overrides the suite, default sid)
set -euo pipefail

prefix=${1:?usage: fetch-containerd.sh PREFIX}
"$(dirname "$0")/fetch-debian.sh" "${CONTAINERD_SUITE:-sid}" "$prefix" usr/bin/containerd \
  containerd
"$prefix/usr/bin/containerd" --version >&2

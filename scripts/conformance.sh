#!/usr/bin/env bash
# critest, the CRI validation suite, against runc and Cocoon side by side (`make conformance`).
# Needs a cri-tools checkout (CRI_TOOLS; read with the fetch tool, never committed): critest is
# built from its vendored source with Debian sid's Go, offline. Debian's docker-registry, nginx
# and procps (this release) are unpacked into a private prefix; cocoon-conformance builds the image
# set, serves it on loopback and runs critest once per handler.
#
#   CRI_TOOLS=/path/to/cri-tools scripts/conformance.sh [cocoon-conformance flags...]
#
# Results: target/conformance/{summary.md,results.json,<handler>.json,<handler>.log}.
set -euo pipefail

cri_tools=${CRI_TOOLS:?set CRI_TOOLS to a cri-tools checkout (kubernetes-sigs/cri-tools, v1.36.0 recorded)}
here=$(cd "$(dirname "$0")/.." && pwd)
go_prefix=${GO_PREFIX:-/var/tmp/cocoon-go126}
parts=${CONFORMANCE_PREFIX:-/var/tmp/cocoon-conformance}
out=${CONFORMANCE_OUT:-$here/target/conformance}
mkdir -p "$out"

"$here/scripts/fetch-debian.sh" sid "$go_prefix" usr/lib/go-1.26/bin/go golang-1.26-go golang-1.26-src
. /etc/os-release
"$here/scripts/fetch-debian.sh" "$VERSION_CODENAME" "$parts" usr/bin/pgrep docker-registry nginx \
  procps libproc2-0

# The vendor directory makes the build offline; GOTOOLCHAIN=local keeps go from asking for
# the toolchain go.mod names.
critest="$out/critest"
version=${CRI_TOOLS_VERSION:-$(git -C "$cri_tools" describe --tags --always 2>/dev/null || echo unknown)}
(
  cd "$cri_tools"
  GOROOT="$go_prefix/usr/lib/go-1.26" GOFLAGS=-mod=vendor GOTOOLCHAIN=local CGO_ENABLED=0 \
    GOCACHE="${GOCACHE:-/var/tmp/cocoon-gocache}" GOPATH="${GOPATH:-/var/tmp/cocoon-gopath}" \
    "$go_prefix/usr/lib/go-1.26/bin/go" test -c -trimpath -o "$critest" \
    -ldflags "-X sigs.k8s.io/cri-tools/pkg/version.Version=${version#v}" \
    sigs.k8s.io/cri-tools/cmd/critest
)

cd "$here"
cargo build --release -p cocoon-tests --bin cocoon-conformance
exec target/release/cocoon-conformance --critest "$critest" --registry "$parts/usr/bin/docker-registry" \
  --parts "$parts" --out "$out" "$@"

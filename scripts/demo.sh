#!/usr/bin/env bash
# make demo: run a container in a VM through containerd and show the guest kernel next to
# the host's. Uses the system containerd if it answers, else starts a private one.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=docker.io/library/cocoon-test:latest
work=$(mktemp -d /tmp/cocoon-demo.XXXXXX)
addr=/run/containerd/containerd.sock
started=""
cleanup() {
  if [ -n "$started" ]; then kill "$started" 2>/dev/null || true; wait "$started" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
if ! ctr --address "$addr" version >/dev/null 2>&1; then
  addr="$work/containerd.sock"
  cat > "$work/config.toml" <<EOT
version = 2
root = "$work/root"
state = "$work/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$addr"
EOT
  containerd --config "$work/config.toml" >"$work/containerd.log" 2>&1 &
  started=$!
  for _ in $(seq 100); do ctr --address "$addr" version >/dev/null 2>&1 && break; sleep 0.1; done
  echo "started a private containerd ($addr)"
fi
target/release/cocoon-test-image "$work/image.tar" >/dev/null
ctr --address "$addr" images import "$work/image.tar" >/dev/null
id="cocoon-demo-$$"
echo "host  kernel: $(uname -r)"
start=$(date +%s.%N)
guest=$(ctr --address "$addr" run --rm --runtime io.containerd.cocoon.v2 "$IMAGE" "$id" uname -r)
end=$(date +%s.%N)
echo "guest kernel: $guest   (ctr run --rm in a VM: $(echo "$end - $start" | bc) s)"
runc=$(ctr --address "$addr" run --rm "$IMAGE" "$id-runc" uname -r)
echo "runc  kernel: $runc   (same image under runc)"

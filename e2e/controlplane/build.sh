#!/usr/bin/env bash
# Builds the control-plane binaries (kube multi-call, etcd, helm) into e2e/.build/bin.
# Skips the build when the Go sources, go.mod, go.sum and the Go version are
# unchanged since the last successful build (stamp file beside the binaries).
# Always runs the compiler at the lowest CPU priority: the machine is shared.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${E2E_BUILD_DIR:-$here/../.build}/bin"
mkdir -p "$out"
cd "$here"

stamp="$( (go version; cat go.mod go.sum; find cmd -name '*.go' -type f | LC_ALL=C sort | xargs cat) | sha256sum | cut -d' ' -f1)"
if [[ -f "$out/.stamp" && "$(cat "$out/.stamp")" == "$stamp" && -x "$out/kube" && -x "$out/etcd" && -x "$out/helm" ]]; then
  echo "controlplane: binaries up to date in $out"
  exit 0
fi

rm -f "$out/.stamp"
start=$(date +%s)
# -trimpath keeps the output independent of the clone's location, so the Go
# build cache is shared between clones; debug info is dropped to cut link time.
nice -n 19 go build -trimpath -ldflags='-s -w' -o "$out/" ./cmd/kube ./cmd/etcd ./cmd/helm
for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  ln -sf kube "$out/$c"
done
echo "$stamp" > "$out/.stamp"
echo "controlplane: built kube, etcd, helm in $(( $(date +%s) - start ))s -> $out"

#!/usr/bin/env bash
# Regenerates the CRDs from the Rust types: crds/dispy.io.yaml and the Helm chart's copy.
# Tests fail when either differs from what this prints (operator/src/main.rs, operator/tests/chart.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run -q -p dispy-operator -- crd > crds/dispy.io.yaml
cp crds/dispy.io.yaml charts/dispy-operator/crds/dispy.io.yaml

#!/usr/bin/env bash
# Benchmark of one dispynode on this machine, beside dispy 4.15's own node and bare Python
# baselines, all in the same run. Prints numbers; asserts nothing.
#   usage: node-image/bench/run.sh [JOBS]     (default 5000)
set -euo pipefail
cd "$(dirname "$0")/../.."
JOBS=${1:-5000}
BENCH=node-image/bench

cargo build --release -q -p dispynode -p dispy-cli --bins --examples
NODE=target/release/dispynode
DISPY=target/release/dispy
CLIENT=target/release/examples/bench_client

echo "== machine: $(nproc) cpus, $(python3 --version), load $(cut -d' ' -f1-3 /proc/loadavg)"
BASELINE=$(python3 -S $BENCH/baseline.py 2000)
echo "$BASELINE"
BARE_FORK=$(echo "$BASELINE" | awk '/fork-per-job/{print $(NF-1)}')

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
PREFIX=$(mktemp -d)
$NODE -i 127.0.0.1 --port "$PORT" --cpus 2 --daemon --dest-path-prefix "$PREFIX" 2>"$PREFIX/node.log" &
NODE_PID=$!
trap 'kill $NODE_PID 2>/dev/null || true; rm -rf "$PREFIX"' EXIT
sleep 0.5
echo "dispynode idle RSS: $(awk '/VmRSS/{print $2, $3}' /proc/$NODE_PID/status)"
for mode in fork reuse program; do
  line=$($CLIENT "127.0.0.1:$PORT" $mode "$JOBS" 1000)
  echo "$line"
  if [ $mode = fork ]; then
    echo "$line" | awk -v bare="$BARE_FORK" '{printf "fork per job / bare fork loop of this run: %.2f\n", $4 / bare}'
  fi
done
echo "dispynode RSS after the runs: $(awk '/VmRSS/{print $2, $3}' /proc/$NODE_PID/status)"

# End to end through the CLI: manifests in, table out, one local node with 2 cpus.
CLI_JOBS=${CLI_JOBS:-10000}
for reuse in true false; do
  python3 - "$CLI_JOBS" "$reuse" > "$PREFIX/jobs.yaml" <<'PY'
import sys
n, reuse = int(sys.argv[1]), sys.argv[2]
print("apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: sq}\nspec:\n  nodes: {cpus: 2}\n  computation:\n    python:\n      reuseWorkers: %s\n      function: sq\n      source: |\n        def sq(n):\n            return n * n" % reuse)
for i in range(n):
    print("---\napiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {name: sq-%d}\nspec: {cluster: sq, args: [%d]}" % (i, i))
PY
  /usr/bin/time -f "%e %M" -o "$PREFIX/time" $DISPY run -q -f "$PREFIX/jobs.yaml" -o json > "$PREFIX/out.json"
  read -r secs rss < "$PREFIX/time"
  finished=$(grep -c '"status": "Finished"' "$PREFIX/out.json" || true)
  python3 -c "import sys; n,s,r,f,m=int(sys.argv[1]),float(sys.argv[2]),int(sys.argv[3]),int(sys.argv[4]),sys.argv[5]; print('dispy run %-6s %6d jobs  %8.0f jobs/s end to end (%.2f s, %d Finished), dispy peak RSS %d kB' % (m, n, n/s, s, f, r))" "$CLI_JOBS" "$secs" "$rss" "$finished" "$([ $reuse = true ] && echo reuse || echo fork)"
done

# The reference, from PyPI, in a venv of its own, inside a private network namespace.
if [ ! -x $BENCH/.venv/bin/python ]; then
  python3 -m venv $BENCH/.venv
  $BENCH/.venv/bin/pip install -q dispy==4.15.2
fi
REF_JOBS=$(( JOBS < 1000 ? JOBS : 1000 ))
REF_PREFIX=$(mktemp -d)
if [ "$(id -u)" = 0 ]; then
  # dispy writes its recover files into the working directory: keep them in the temp dir.
  ROOT=$PWD
  timeout 180 unshare -n bash -c "
    cd $REF_PREFIX
    ip link set lo up
    $ROOT/$BENCH/.venv/bin/dispynode.py -i 127.0.0.1 --clean --daemon --dest_path_prefix $REF_PREFIX/node >/dev/null 2>&1 &
    sleep 2
    $ROOT/$BENCH/.venv/bin/python $ROOT/$BENCH/reference.py $REF_JOBS
    kill %1" || echo "reference: dispy's node hung or failed within 180 s (a known dispy 4.15 race)"
else
  echo "reference: skipped, it needs root for a private network namespace (dispynode broadcasts)"
fi
rm -rf "$REF_PREFIX"

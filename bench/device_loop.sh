#!/usr/bin/env bash
# The whole loop on the lent GPU machine (docs/benchmarks.md "The loop on a GPU"), after the carry parts are
# in /tmp/carry: set up, build the base, apply the GPU profile, `loraflow demo` (retrain -> gate -> registry ->
# vLLM on the GPU behind the gateway -> the demo's requests with the openai client -> drift-check).
#   bash bench/device_loop.sh start    # in the background (setsid): survives the call that starts it
#   bash bench/device_loop.sh wait S   # up to S seconds for it; copies the results to $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_setup.sh || exit 1
case "${1:-}" in
start)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  setsid bash -c '
    set -o pipefail
    { time python3 bench/device_base.py --shape qwen2.5-0.5b --out /tmp/models/qwen2.5-0.5b-shaped --steps 300; } 2>&1 | tee /tmp/base.log
    loraflow profile gpu && loraflow profile bench/device_params.yaml
    { time loraflow demo --requests 40; } > /tmp/demo.log 2>&1
    echo "exit $?" >> /tmp/demo.log; touch /tmp/demo.done' > /tmp/loop.log 2>&1 < /dev/null &
  ;;
wait)
  end=$((SECONDS + ${2:-500}))
  while [ ! -f /tmp/demo.done ] && [ $SECONDS -lt $end ]; do sleep 5; done
  tail -n 5 /tmp/base.log; tail -n 60 /tmp/demo.log
  mkdir -p "$OUT"; cp /tmp/base.log /tmp/demo.log "$OUT"/ 2>/dev/null
  cp reports/last-run.json reports/eval/metrics.json "$OUT"/ 2>/dev/null
  [ -f /tmp/demo.done ] && echo "LOOP DONE" || echo "LOOP STILL RUNNING"
  ;;
esac

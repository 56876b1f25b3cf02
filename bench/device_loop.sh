#!/usr/bin/env bash
# Issue 26's device work (bench/device_run.sh: the loop, the openai client, the gateway and training
# benches) on the lent GPU machine, after the carry parts are in /tmp/carry:
#   bash bench/device_loop.sh start     # set up, then the run in the background (setsid): it survives the call
#   bash bench/device_loop.sh wait S    # up to S seconds; prints the phases, returns /tmp/results as one tar
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_setup.sh || exit 1
R=/tmp/results
case "${1:-}" in
start)
  mkdir -p $R
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $R/gpu.txt
  setsid bash bench/device_run.sh > $R/run.log 2>&1 < /dev/null &
  sleep 20; cat $R/phases.log
  ;;
wait)
  end=$((SECONDS + ${2:-500}))
  while [ ! -f $R/all.done ] && [ $SECONDS -lt $end ]; do sleep 5; done
  cat $R/phases.log; echo "--- $(readlink $R/current.log)"; tail -n 30 $R/current.log
  mkdir -p "$OUT"; tar czf "$OUT/results.tgz" -C /tmp results/ 2>/dev/null
  [ -f $R/all.done ] && echo "ALL DONE" || echo "STILL RUNNING"
  ;;
esac

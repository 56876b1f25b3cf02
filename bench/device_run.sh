#!/usr/bin/env bash
# Issue 26's device work in one run, phase after phase (bench/device_loop.sh starts it in the background):
#   base     the Qwen2.5-0.5B-shaped base, self-pretrained on the GPU (no hub)
#   demo     `loraflow profile gpu` + bench/device_params.yaml, then `loraflow demo --keep-serving`:
#            retrain -> gate -> registry -> vLLM on the GPU behind the gateway -> 40 requests -> drift-check
#   openai   40 held-out prompts through that gateway with the openai client (bench/openai_requests.py)
#            (if the gate rejected v1: bench/device_gate.yaml, and the demo again: only the gate re-runs)
#   train    bench/train_gpu.py on Llama-3.2-1B: plain TRL (defaults and tuned) vs the train stage's levers
#   gateway  gateway vs direct vLLM on the GPU, 8/32/128 clients (bench/gateway_overhead.py)
#   train8b  the train stage's QLoRA on Llama-3.1-8B's shape: MFU and memory (no plain-TRL run: device time)
# Phases run in order of what is least measured so far; a lease that ends early returns the finished ones.
# Each phase's output is /tmp/results/<phase>.log; /tmp/results/phases.log has one line per phase.
set -o pipefail
cd "$(dirname "$0")/.."
source bench/device_setup.sh
R=/tmp/results
KEY=device-loop-key
phase() {
  local name=$1; shift
  echo "$(date +%T) $name: start" >> $R/phases.log
  ln -sf $R/$name.log $R/current.log
  local t=$SECONDS
  "$@" > $R/$name.log 2>&1
  local rc=$?
  echo "$(date +%T) $name: exit $rc after $((SECONDS - t))s" >> $R/phases.log
  return $rc
}
demo() {  # the demo, kept serving; then the openai client against it; then Ctrl-C (the endpoint stops)
  rm -f reports/last-run.json
  echo "$(date +%T) $1: start" >> $R/phases.log; ln -sf $R/$1.log $R/current.log
  LORAFLOW_API_KEYS=$KEY loraflow demo --requests 40 --keep-serving > $R/$1.log 2>&1 &
  local pid=$!
  while kill -0 $pid 2>/dev/null && ! grep -q "keeps answering" $R/$1.log; do sleep 2; done
  if ! kill -0 $pid 2>/dev/null; then wait $pid; return $?; fi
  read -r url model < <(python3 -c "import json; s = json.load(open('reports/last-run.json'))['serving']; print(s['url'], s['served'])")
  phase openai /tmp/bin/vpython bench/openai_requests.py --url "$url" --key $KEY --model "$model" --n 40
  kill -TERM $pid; wait $pid   # the demo stops its endpoint on SIGTERM (background jobs ignore SIGINT)
  echo "after SIGTERM: $(pgrep -fc vllm.entrypoints) vLLM server processes left" >> $R/$1.log
  return 0
}
save() {  # what one demo run decided and measured
  for f in reports/last-run.json reports/gate.json reports/train.json reports/vllm.log reports/eval/metrics.json \
           reports/eval/details.json reports/eval/vllm.log; do
    [ -f $f ] && cp $f "$R/$1_$(echo ${f#reports/} | tr / _)"
  done
}
phase base python3 bench/device_base.py --shape qwen2.5-0.5b --out /tmp/models/qwen2.5-0.5b-shaped --steps 300
phase profile bash -c 'loraflow profile gpu && loraflow profile bench/device_params.yaml'
demo demo; rc=$?
echo "$(date +%T) demo: exit $rc" >> $R/phases.log; save demo
if [ $rc -ne 0 ] && grep -q "has no champion" $R/demo.log; then
  phase profile2 loraflow profile bench/device_gate.yaml
  demo demo2; rc=$?   # (not "$(date) ... $?": the command substitution would reset $?)
  echo "$(date +%T) demo2: exit $rc" >> $R/phases.log; save demo2
fi
phase train python3 bench/train_gpu.py --model llama-3.2-1b --steps 10 --warmup 4 --rows 1000 --repeats 3 \
  --variants baseline,baseline_qlora_tuned,qlora_packed_liger_a3_fused,qlora_packed_liger_a1_fused \
  --out $R --tag _h200
phase gateway python3 bench/gateway_overhead.py --clients 8,32,128 --runs 3 --requests 8 \
  --base /tmp/models/qwen2.5-0.5b-shaped --adapter artifacts/adapter --serve-python /tmp/bin/vpython --gpu
phase train8b python3 bench/train_gpu.py --model llama-3.1-8b --steps 6 --warmup 2 --rows 400 --repeats 3 \
  --no-baseline --variants qlora_packed_liger_a1_fused,qlora_packed_liger_a3_fused --out $R --tag _h200
touch $R/all.done

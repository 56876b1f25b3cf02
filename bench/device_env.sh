#!/usr/bin/env bash
# Runs a command on the lent GPU machine with the project's pinned stack, once the parts that
# `python3 bench/device_carry.py` builds are in /tmp/carry (bench/device_setup.sh installs them):
#   bash bench/device_env.sh python3 bench/train_gpu.py --model llama-3.2-1b
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/device_setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)"
"$@"

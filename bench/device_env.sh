#!/usr/bin/env bash
# Runs a command on the lent GPU machine with the project's pinned training stack, which travels as
# wheels in .whl/ (transformers, trl, peft, datasets, liger-kernel, pydantic, ...) and a slimmed
# bitsandbytes in .bnb/ (only the CUDA 13.0 library; the full wheel is over the transfer limit).
#   bash bench/device_env.sh python3 bench/train_gpu.py --model llama-3.2-1b
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD/.bnb:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)"
"$@"

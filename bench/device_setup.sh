#!/usr/bin/env bash
# On the lent GPU machine: join the parts bench/device_carry.py built (each call of the chain copied one to
# /tmp/carry), check the digest, and install the pipeline environment (/tmp/site), bitsandbytes and vLLM
# (/tmp/vsite, its own environment as on any host: its pins conflict with Prefect's). Source it:
#   source bench/device_setup.sh     # then loraflow, python -m pipeline, pytest work with the GPU
set -eo pipefail
if [ ! -f /tmp/site/.installed ]; then
  want=$(cut -d' ' -f1 /tmp/carry/SHA256)
  cat /tmp/carry/carry.part* > /tmp/carry.tar.xz
  got=$(sha256sum /tmp/carry.tar.xz | cut -d' ' -f1)
  [ "$got" = "$want" ] || { echo "carry: digest $got, expected $want (a part is missing or stale)"; exit 1; }
  xz -dc -T0 /tmp/carry.tar.xz | tar x -C /tmp && rm /tmp/carry.tar.xz
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/carry/whl/*.whl
  cp -r /tmp/carry/bnb/bitsandbytes /tmp/site/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/vsite /tmp/carry/vdeps/*.whl
  cp -r /tmp/carry/vsite/* /tmp/vsite/
  mkdir -p /tmp/bin
  # serve.python: vLLM's environment (the device's torch and transformers, vLLM and its own pins).
  printf '#!/bin/sh\nPYTHONPATH=/tmp/vsite exec python3 "$@"\n' > /tmp/bin/vpython
  printf '#!/bin/sh\nexec python3 -c "import sys; from flows.cli import main; sys.argv[0] = \\"loraflow\\"; main()" "$@"\n' > /tmp/bin/loraflow
  command -v python >/dev/null || ln -s "$(command -v python3)" /tmp/bin/python
  chmod +x /tmp/bin/*
  touch /tmp/site/.installed
fi
export PATH="/tmp/bin:/tmp/site/bin:$PATH" PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
set +eo pipefail

#!/usr/bin/env bash
# Builds the vLLM carry for the lent GPU machine (bench/vllm_gpu.py): vLLM 0.22.0 (pins torch 2.11, CUDA 13,
# like the device image) without the FlashAttention-2 and MoE kernels and the Rust frontend (Hopper uses
# FA3), plus bench/vllm_gpu_wheels.txt, split into parts under .vllm/p0..pN that fit one call each
# (the first part is small so it can travel with .whl and .bnb).
#   bash bench/vllm_bundle.sh && ls .vllm
# On the device, after carrying every part (one call each, back to back while the machine stays warm):
#   cat /tmp/vparts/bundle.part* | tar x -C /tmp/vparts && mkdir -p /tmp/vsite &&
#   python3 -m pip install -q --no-index --no-deps --target /tmp/vsite /tmp/vparts/vdeps/*.whl &&
#   xz -dc /tmp/vparts/vllm-slim.tar.xz | tar x -C /tmp/vsite && PYTHONPATH=/tmp/vsite python3 bench/vllm_gpu.py
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
plat=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp --platform any
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for n in 17 24 26 27 28 31 34 35; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q "${plat[@]}" -d "$work" vllm==0.22.0
mkdir -p "$work/slim" "$work/vdeps"
(cd "$work/slim" && unzip -q "$work"/vllm-0.22.0-*.whl -x 'vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so' \
    'vllm/_moe_C.abi3.so' 'vllm/vllm-rs' 'vllm/third_party/deep_gemm/_C.cpython-31[0134]-*' \
    'vllm/entrypoints/serve/instrumentator/static/*' && tar cf - vllm vllm-0.22.0.dist-info | xz -T0 -6 > ../vllm-slim.tar.xz)
python3 -m pip download -q "${plat[@]}" -d "$work/vdeps" -r <(grep -v '^#' "$root/bench/vllm_gpu_wheels.txt")
(cd "$work" && tar cf bundle.tar vllm-slim.tar.xz vdeps)
rm -rf "$root/.vllm" && mkdir -p "$root/.vllm"
python3 - "$work/bundle.tar" "$root/.vllm" <<'PY'
import sys
from pathlib import Path
src, out = sys.argv[1], Path(sys.argv[2])
with open(src, "rb") as f:
    i, size = 0, 30 * 2**20
    while chunk := f.read(size):
        (out / f"p{i}").mkdir()
        (out / f"p{i}" / f"bundle.part{i}").write_bytes(chunk)
        i, size = i + 1, 58 * 2**20
PY
sha256sum "$work/bundle.tar"
rm -rf "$work"
du -sh "$root"/.vllm/*

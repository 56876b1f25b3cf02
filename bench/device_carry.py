"""Builds everything the lent GPU machine needs for the whole loop, from the lock files, in one command:

    python3 bench/device_carry.py            # -> .carry/p0 .. .carry/pN (git-ignored), sha256 in .carry/p0/SHA256

- the pipeline environment: every pin of requirements/pipeline.lock (Prefect, MLflow, DVC, Evidently,
  TRL, phonenumbers, Faker, ...) as cp312 manylinux wheels, except what the device image already has in a
  compatible version (torch and CUDA, numpy, scipy, pyarrow, scikit-learn, ...: DEVICE_HAS below);
  sdist-only pins are built into wheels here;
- the GPU extras of pyproject's `gpu` extra and the train stage: bitsandbytes slimmed to its CUDA 13.0
  library (the whole wheel is over a call's transfer limit) and liger-kernel;
- vLLM for CUDA 13 / torch 2.11 like the device image (bench/vllm_gpu_wheels.txt lists its missing
  dependencies), without the FlashAttention-2 and MoE kernels Hopper does not use.

All of it is one tar split into parts that each fit one call's 64 MiB with the repository. On the device,
carry one part per call (back to back, the machine stays warm between them), each call copying its part to
/tmp/carry; then `bash bench/device_setup.sh` joins and installs them (bench/device_loop.sh does it all).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PART_MB = 56
VLLM = "vllm==0.22.0"  # the release that pins torch 2.11 and CUDA 13, like the device image
GPU_EXTRAS = ["bitsandbytes==0.50.2", "liger-kernel==0.8.5"]
# In the device image (KINDS.md) in a version the pipeline works with; large or ABI-bound: not carried.
DEVICE_HAS = {"torch", "numpy", "scipy", "pyarrow", "scikit-learn", "pillow", "matplotlib", "contourpy",
              "fonttools", "kiwisolver", "sympy", "networkx", "mpmath", "statsmodels", "patsy", "lxml",
              "opt-einsum", "absl-py", "cycler", "pyparsing", "threadpoolctl", "joblib", "markupsafe",
              "jinja2", "pyyaml", "packaging", "typing-extensions", "setuptools"}
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "any",
            "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64",
            *[a for n in (17, 24, 26, 27, 28, 31, 34, 35) for a in ("--platform", f"manylinux_2_{n}_x86_64")]]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path) -> list[str]:
    out = []
    for line in lock.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line and norm(line.split("==")[0]) not in DEVICE_HAS:
            out.append(line)
    return out


def download(reqs: list[str], dest: Path) -> None:
    """cp312 manylinux wheels; a pin with no such wheel (sdist only) is built into a wheel here."""
    dest.mkdir(parents=True, exist_ok=True)

    def get(req: str) -> str | None:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            *PLATFORM, "-d", str(dest), req], capture_output=True, text=True)
        return req if r.returncode else None

    with ThreadPoolExecutor(8) as pool:  # network-bound
        missing = [r for r in pool.map(get, reqs) if r]
    missing = [r for r in missing if get(r)]  # once more, one at a time: a parallel fetch can fail transiently
    for req in missing:  # pure-Python sdists only (a compiled one would be built for this machine: refuse)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), req], check=True)
        built = sorted(dest.glob(f"{norm(req.split('==')[0]).replace('-', '_')}-*.whl"), key=lambda p: p.stat().st_mtime)
        if not built or not built[-1].name.endswith("-none-any.whl"):
            sys.exit(f"{req}: no cp312 manylinux wheel and not pure Python; cannot carry it")
    print(f"carry: {len(reqs)} wheels ({len(missing)} built from sdists) in {dest.name}", flush=True)


def slim_bitsandbytes(wheel_dir: Path, dest: Path) -> None:
    """bitsandbytes' package with only its CUDA 13.0 library (the device's CUDA)."""
    whl = next(wheel_dir.glob("bitsandbytes-*.whl"))
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            name = info.filename
            if name.startswith("bitsandbytes/") and (not name.endswith(".so") or "cuda130" in name):
                z.extract(info, dest)
    whl.unlink()


def vllm_bundle(dest: Path) -> None:
    work = dest / "vllm-dl"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *PLATFORM,
                    "-d", str(work), VLLM], check=True)
    whl = next(work.glob("vllm-*.whl"))
    skip = re.compile(r"vllm/(vllm_flash_attn/_vllm_fa2_C\.abi3\.so|_moe_C\.abi3\.so|vllm-rs|"
                      r"third_party/deep_gemm/_C\.cpython-31[0134]-.*|entrypoints/serve/instrumentator/static/.*)$")
    site = dest / "vsite"
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            if not skip.match(info.filename):
                z.extract(info, site)
    shutil.rmtree(work)
    deps = [x.strip() for x in (ROOT / "bench/vllm_gpu_wheels.txt").read_text().splitlines()
            if x.strip() and not x.startswith("#")]
    download(deps, dest / "vdeps")


def main() -> None:
    out = ROOT / ".carry"
    with tempfile.TemporaryDirectory(prefix="carry-") as tmp:
        stage = Path(tmp) / "carry"
        download(pins(ROOT / "requirements/pipeline.lock") + GPU_EXTRAS, stage / "whl")
        slim_bitsandbytes(stage / "whl", stage / "bnb")
        vllm_bundle(stage)
        tar = Path(tmp) / "carry.tar.xz"
        subprocess.run(f"tar -C {tmp} -cf - carry | xz -T0 -6 > {tar}", shell=True, check=True)
        digest = hashlib.sha256(tar.read_bytes()).hexdigest()
        shutil.rmtree(out, ignore_errors=True)
        with open(tar, "rb") as fh:
            i = 0
            while chunk := fh.read(PART_MB * 2**20):
                (out / f"p{i}").mkdir(parents=True)
                (out / f"p{i}" / f"carry.part{i:02d}").write_bytes(chunk)
                i += 1
        (out / "p0" / "SHA256").write_text(f"{digest}  carry.tar.xz\n")
    print(f"carry: {i} parts of at most {PART_MB} MiB in {out}, sha256 {digest[:16]}...", flush=True)


if __name__ == "__main__":
    main()

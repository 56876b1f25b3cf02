"""A vLLM start that fails for a reason outside it (another process on the GPU released or took memory while
vLLM profiled) is started again, up to three starts; any other start-up failure stops with its
root cause on the error's first line. Injected in front of the real vLLM CPU server."""

import socket
from pathlib import Path

import pytest

from pipeline.config import ServeConfig
from pipeline.serve.vllm import ServingError, VLLMServer
from tests.conftest import ROOT

VLLM_PYTHON = ROOT / ".venv-vllm/bin/python"
pytestmark = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="needs the vLLM CPU environment (make vllm-env)")
PROFILING = ("AssertionError: Error in memory profiling. Initial free memory 20.1 GiB, current free memory "
             "22.3 GiB. This happens when other processes sharing the same container release GPU memory")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wrapper(tmp: Path, fail_line: str, times: int) -> Path:
    """serve.python that fails its first ``times`` starts as vLLM would, then runs the real server."""
    count = tmp / "starts"
    w = tmp / "python"
    w.write_text(f"""#!/bin/sh
n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}
if [ "$n" -lt {times} ]; then
  echo "{fail_line}" >&2
  echo "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {{}}" >&2
  exit 1
fi
exec {VLLM_PYTHON} "$@"
""")
    w.chmod(0o755)
    return w


# Another process took memory while vLLM profiled (the H200 loop, 2026-12-03: the serving vLLM's KV cache
# while the evaluate engine started): vLLM counts it as its own and has none left for its cache.
NO_CACHE = ("ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when "
            "initializing the engine")


@pytest.mark.parametrize("fail_line", [PROFILING, NO_CACHE], ids=["memory-released", "memory-taken"])
def test_a_start_disturbed_by_another_process_starts_again(tiny_base, tmp_path, fail_line):
    cfg = ServeConfig(python=str(_wrapper(tmp_path, fail_line, 1)), port=_port(), log_file=str(tmp_path / "v.log"))
    said: list[str] = []
    server = VLLMServer.start(cfg, tiny_base, api_key="k")
    try:
        server.wait_ready(progress=said.append)
        assert server.starts == 2 and (tmp_path / "starts").read_text().strip() == "2"
        assert any(fail_line[:40] in s and "start 2 of 3" in s for s in said), said
        assert server.models()  # the second start serves
    finally:
        server.stop()


def test_any_other_start_failure_stops_with_its_cause(tiny_base, tmp_path):
    bad = "ValueError: Free memory on device (3.1/139.8 GiB) on startup is less than desired GPU memory utilization"
    cfg = ServeConfig(python=str(_wrapper(tmp_path, bad, 5)), port=_port(), log_file=str(tmp_path / "v.log"))
    server = VLLMServer.start(cfg, tiny_base)
    try:
        with pytest.raises(ServingError, match=r"during start-up: ValueError: Free memory on device"):
            server.wait_ready()
        assert server.starts == 1 and (tmp_path / "starts").read_text().strip() == "1"  # not tried again
    finally:
        server.stop()


def test_transient_failures_keep_failing_after_the_last_attempt(tiny_base, tmp_path):
    cfg = ServeConfig(python=str(_wrapper(tmp_path, PROFILING, 5)), port=_port(), log_file=str(tmp_path / "v.log"))
    server = VLLMServer.start(cfg, tiny_base)
    try:
        with pytest.raises(ServingError, match="Error in memory profiling"):
            server.wait_ready()
        assert (tmp_path / "starts").read_text().strip() == "3"
    finally:
        server.stop()

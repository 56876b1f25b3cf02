"""Run one DVC stage: ``python -m pipeline <stage> [--params params.yaml]``."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import ConfigError, load_params
from pipeline.stages import STAGES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    ap.add_argument("stage", nargs="?", choices=sorted(STAGES))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--list", action="store_true", help="list the stages and exit")
    args = ap.parse_args(argv)
    if args.list or not args.stage:
        print("\n".join(STAGES))
        return 0
    try:
        params = load_params(args.params)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.stage == "train":
        from pipeline.train.launch import relaunch

        cmd = relaunch(params.train.distributed, list(argv if argv is not None else sys.argv[1:]))
        if cmd is not None:  # train.distributed: the same stage in every torchrun process
            import subprocess

            d = params.train.distributed
            print(f"train: {d.nproc_per_node} process(es) on each of {d.nnodes} node(s): {' '.join(cmd)}",
                  flush=True)
            return subprocess.run(cmd).returncode
    try:
        result = STAGES[args.stage](params)
    except ConfigError as err:  # a setting that only a stage can check (a missing database, no inputs)
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({args.stage: result}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

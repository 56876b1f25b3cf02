"""Architecture rules that keep the codebase shaped as docs/architecture.md describes."""

import ast
from pathlib import Path

import yaml

from pipeline.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module.split(".")[0])
    return mods


def test_pipeline_never_imports_prefect_or_flows():
    offenders = {p.name: _imports(p) & {"prefect", "flows"} for p in (ROOT / "pipeline").glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_mlflow_folder_is_not_a_package():
    assert not (ROOT / "mlflow" / "__init__.py").exists()


def test_dvc_stages_are_the_pipeline_stages_in_order():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == list(STAGES)
    produced: set[str] = set()
    for name, stage in dvc.items():
        assert stage["cmd"] == f"python -m pipeline {name}"
        # Every data dependency is raw data or an output of an earlier stage (topological order).
        for dep in stage["deps"]:
            if dep.startswith(("pipeline/", "data/raw/")) or dep == "data/raw":
                continue
            assert any(dep == o or dep.startswith(o + "/") for o in produced), f"{name}: {dep} not produced earlier"
        for out in stage.get("outs", []):
            produced.add(out if isinstance(out, str) else next(iter(out)))
        # Every params section a stage reads exists in params.yaml.
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert part in node, f"{name}: params key {key} missing"
                node = node[part]

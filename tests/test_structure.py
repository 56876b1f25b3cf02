"""Architecture rules that keep the codebase shaped as docs/architecture.md describes."""

import ast
from pathlib import Path

import yaml

from pipeline.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path, depth: int = 1) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods.update(".".join(a.name.split(".")[:depth]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(".".join(node.module.split(".")[:depth]))
    return mods


MODULES = sorted((ROOT / "pipeline").rglob("*.py"))


def test_pipeline_never_imports_prefect_or_flows():
    offenders = {str(p.relative_to(ROOT)): _imports(p) & {"prefect", "flows"} for p in MODULES}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_one_subpackage_per_stage_and_stages_do_not_reach_into_each_other():
    stages = {"tasks", "data", "augment", "train", "evaluate", "release", "serve", "monitor"}
    assert stages <= {p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").is_file()}
    # evaluate and monitor share helpers through the kernel (io, modeling), never through train.
    for stage in ("evaluate", "monitor", "tasks", "data"):
        for f in (ROOT / "pipeline" / stage).rglob("*.py"):
            assert "pipeline.train" not in _imports(f, depth=2), f


def test_stage_code_names_no_demo_domain():
    for f in MODULES:
        if f.name == "demo.py":  # the demo data generator is data, not stage code
            continue
        text = f.read_text().lower()
        for word in ('"category"', '"priority"', "ticket-triage", "ticket triage"):
            assert word not in text, f"{f.relative_to(ROOT)} mentions {word}"


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

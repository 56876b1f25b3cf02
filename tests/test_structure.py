"""Architecture rules that keep the codebase shaped as docs/architecture.md describes."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from pipeline.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


MODULES = sorted((ROOT / "pipeline").rglob("*.py"))


def _contract_layers() -> list[list[str]]:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    return [sorted(m.strip() for m in re.split(r"[|:]", layer)) for layer in layers]


def _documented_layers() -> list[list[str]]:
    """The layer table in docs/architecture.md's "Import rules" block, top layer first."""
    doc = (ROOT / "docs/architecture.md").read_text()
    block = doc.split("<!-- import-rules -->")[1].split("```")[1]
    rows = [line.split(":", 1)[1] for line in block.strip().splitlines()[1:] if ":" in line]
    return [sorted(m.strip() for m in row.split(",")) for row in rows]


def test_import_rules_hold():
    """lint-imports checks the contracts in pyproject.toml (stages independent, shared code imports no stage,
    no Prefect in pipeline/); it fails on any violation, direct or through a chain of imports."""
    proc = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "0 broken" in proc.stdout, proc.stdout[-4000:]


def test_import_rules_cover_every_module_and_match_the_document():
    layers = _contract_layers()
    named = {m for layer in layers for m in layer}
    top = {f"pipeline.{p.stem}" for p in (ROOT / "pipeline").iterdir()
           if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert top - named == set(), "a module no import rule places: add it to a layer in pyproject.toml"
    assert _documented_layers() == layers, "docs/architecture.md's import rules and pyproject.toml differ"


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


def test_every_module_imports_first_in_a_fresh_interpreter():
    """No import cycle that only a lucky import order hides (e.g. pipeline.tasks before pipeline.config)."""
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for p in MODULES if p.name != "__main__.py")
    failed = {}
    for mod in modules:
        proc = subprocess.run([sys.executable, "-c", f"import {mod}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        if proc.returncode:
            failed[mod] = proc.stderr.strip().splitlines()[-1]
    assert failed == {}


def test_every_seam_in_the_architecture_page_names_a_test_that_exists():
    """docs/architecture.md lists each producer -> consumer seam with the test that feeds the consumer what
    the real producer wrote; a seam whose test was renamed or removed fails here."""
    doc = (ROOT / "docs/architecture.md").read_text()
    table = doc.split("<!-- seams -->")[1].split("\n\n")[0]
    rows = [r for r in table.strip().splitlines()[2:] if r.startswith("|")]
    assert len(rows) >= 8, table
    for row in rows:
        ref = row.strip("|").split("|")[-1].strip()
        path, _, name = ref.partition("::")
        source = (ROOT / path).read_text()
        assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{ref}: no such test"

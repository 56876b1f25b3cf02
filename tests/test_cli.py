"""The `loraflow` command line, in-process through typer's runner."""

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_sanitize_writes_the_contracted_files(tmp_path):
    res = runner.invoke(app, ["sanitize", str(ROOT / "data/raw/tickets_train.jsonl"), "--out", str(tmp_path),
                              "--params", str(ROOT / "params.yaml")])
    assert res.exit_code == 0, res.output
    assert {p.name for p in tmp_path.iterdir()} == {"clean.jsonl", "validation.jsonl", "quarantine.jsonl",
                                                    "report.json", "data_card.md", "pii_digests.txt"}
    report = json.loads((tmp_path / "report.json").read_text())
    assert f"read {report['read']} = kept {report['kept']}" in res.output


def test_sanitize_without_valid_records_fails_clearly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("oops\n")
    res = runner.invoke(app, ["sanitize", str(bad), "--out", str(tmp_path / "o"), "--params", str(ROOT / "params.yaml")])
    assert res.exit_code == 1 and "bad.jsonl: no valid record in 1 lines (invalid_json=1)" in res.output


def test_promote_and_rollback_through_the_cli(tmp_path, monkeypatch):
    from pipeline import registry
    from pipeline.config import load_params

    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["registry"].update(tracking_uri=f"sqlite:///{tmp_path}/m.db", artifact_root=str(tmp_path / "art"))
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    p = load_params("params.yaml")
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    for _ in range(2):
        run_id = registry.log_candidate(p.registry, run_name="r", params={}, adapter_dir=adapter, train_metrics={},
                                        eval_metrics={}, artifacts={}, tags={})
        registry.register(p.registry, p.project.name, run_id, {}, "card")
    res = runner.invoke(app, ["rollback"])
    assert res.exit_code == 1 and "no @champion to roll back from" in res.output
    assert runner.invoke(app, ["promote", "1"]).exit_code == 0
    res = runner.invoke(app, ["promote", "2"])
    assert res.exit_code == 0 and res.output.strip().endswith("@champion -> v2")
    res = runner.invoke(app, ["rollback"])
    assert res.output.strip().endswith("@champion -> v1")
    res = runner.invoke(app, ["status"])
    lines = res.output.splitlines()
    assert lines[0].split()[:2] == ["prefect-server", "down"]  # no platform running here
    assert any(line.startswith("v1") and "@champion" in line for line in lines), res.output
    assert f"champion: {p.project.name}@champion = v1" in res.output
    moves = [line.split() for line in lines if "  by " in line]  # the alias history, newest last
    assert [m[1:4] for m in moves] == [["none", "->", "v1"], ["v1", "->", "v2"], ["v2", "->", "v1"]]
    assert moves[-1][-3:] == ["rollback", "from", "v2"]
    # The dossier of a version registered with no reports (an older loraflow): every section is there,
    # what was never recorded says so, and the approvals name their path.
    res = runner.invoke(app, ["dossier", "--no-publish"])
    assert res.exit_code == 0, res.output
    md = Path(f"reports/dossier/{p.project.name}-v1.md").read_text()
    assert all(f"## {n}. " in md for n in range(1, 10)) and "No sanitize report recorded." in md
    assert "| v2 -> v1 | loraflow rollback from v2 | CLI (loraflow rollback) |" in md
    assert "| none -> v1 | loraflow promote | CLI (loraflow promote) |" in md
    assert "differential privacy**: none" in md
    res = runner.invoke(app, ["dossier", p.project.name, "99"])
    assert res.exit_code == 1 and "v99 is not registered" in res.output


def test_sanitize_works_from_any_directory_without_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "mine.jsonl"
    data.write_text('{"prompt": "Сколько стоит доставка?", "completion": "500 рублей"}\n'
                    '{"prompt": "东京的人口是多少？", "completion": "约1400万"}\n')
    res = runner.invoke(app, ["sanitize", str(data), "--out", "out"])
    assert res.exit_code == 0, res.output
    assert "built-in sanitize defaults" in res.output and "read 2 = kept 2" in res.output

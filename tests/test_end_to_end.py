"""The whole loop with real components: DVC, Prefect (test server), TRL/peft, MLflow, vLLM (CPU), Evidently.

Runs in a throw-away copy of the project, as a fresh clone would be, on a smaller training config.
"""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
VLLM_PYTHON = ROOT / ".venv-vllm/bin/python"
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_params(**sections):
    raw = yaml.safe_load(Path("params.yaml").read_text())
    for section, values in sections.items():
        raw[section].update(values)
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _check_dossier(p, version, page: Path) -> None:
    from pipeline import registry

    assert page.is_file() and page.suffix == ".html" and page.with_suffix(".md").is_file()
    md, html = page.with_suffix(".md").read_text(), page.read_text()
    for n in range(1, 10):  # the nine Annex IV sections
        assert f"## {n}. " in md and f"<h2>{n}. " in html
    c = registry.client(p.registry)
    run = c.get_run(version.run_id)
    assert f"| exact_match | {run.data.metrics['candidate_exact_match']:.4f} | {run.data.metrics['base_exact_match']:.4f} |" in md
    sanitize = json.loads(Path(p.sanitize.out_dir, "train", "report.json").read_text())
    assert f"| train | {sanitize['read']} | {sanitize['kept']} | {sanitize['quarantined']['total']} |" in md
    assert version.tags["gate_interval"].split(" ")[0] in md  # the gate's paired difference
    assert "gate (automatic, after the gate passed)" in md and "differential privacy**: none" in md
    assert {f.path for f in c.list_artifacts(version.run_id, "dossier")} == {
        f"dossier/{page.name}", f"dossier/{page.with_suffix('.md').name}"}


@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="vLLM environment missing: run `make vllm-env`")
def test_full_loop_then_rerun_then_retrain_then_promotion_follows(project, prefect_server):
    from flows.demo import run_demo
    from flows.retrain import retrain
    from pipeline import registry
    import mlflow.artifacts
    from openai import OpenAI

    from pipeline.config import load_params
    from pipeline.release.lineage import dvc_lock_hashes

    _set_params(serve={"python": str(VLLM_PYTHON), "port": _free_port(),
                                            "gateway_port": _free_port()})
    p = load_params("params.yaml")
    subprocess.run(["git", "commit", "-qam", "test settings"], check=True, env=GIT_ENV)

    # 1. The demo: every stage runs, the candidate beats the base, is promoted, served and monitored.
    report, endpoint = run_demo("params.yaml", requests=25, keep_serving=True, progress=print)
    key = next(iter(endpoint.keys))
    client = OpenAI(base_url=endpoint.url, api_key=key)
    try:
        assert all(s["ran"] for s in report["stages"].values()), report["stages"]
        train = report["records"]["train"]
        assert train["read"] == train["kept"] + train["quarantined"] + train["duplicates"]
        assert train["quarantined"] == 7 and train["redactions"] > 100
        base, cand = report["metrics"]["base"], report["metrics"]["candidate"]
        assert cand["exact_match"] >= base["exact_match"] + 0.5, report["metrics"]
        assert report["gate"]["promote"] and report["model"]["champion"]["version"] == 1
        assert report["serving"]["served"] == p.project.name and report["serving"]["version"] == 1
        assert report["serving"]["served_metric"] == "exact_match" and report["serving"]["served_score"] >= 0.5
        assert json.loads(report["serving"]["sample"]["answer"]).keys() == {"category", "priority"}

        # What a client with the openai defaults (temperature 1.0, top-p 1.0) gets: confident, valid answers.
        from pipeline.io import load_chat_file
        from pipeline.layout import clean_split
        from pipeline.tasks import build_task

        task = build_task(p.task)
        rows = load_chat_file(clean_split(p, "eval"))[:20]
        sampled = [client.chat.completions.create(model=p.project.name, messages=r["prompt"], temperature=1.0,
                                                  top_p=1.0).choices[0].message.content for r in rows]
        assert sum(task.check_reference(a) is None for a in sampled) >= 19, sampled
        exact = sum(task.score(a, r["completion"][0]["content"]).values["exact_match"] for a, r in zip(sampled, rows))
        assert exact >= 18, sampled
        assert report["drift"]["status"] == "ok" and report["drift"]["drift"] is False
        assert json.loads(Path("reports/last-run.json").read_text())["model"]["registered_version"] == 1
        endpoint.log.flush()  # the demo's 25 requests and the 20 above, all through the gateway
        logged = [json.loads(line) for line in Path(p.serve.traffic_log).read_text().splitlines()]
        assert len(logged) == 45 and {r["model"] for r in logged} == {p.project.name}, logged[:2]
        assert all(r["version"] == 1 and r["status"] == 200 for r in logged)

        # Lineage: the version carries the hashes DVC recorded, the commit and a model card.
        v1 = registry.get_alias(p.registry, p.project.name)
        lock = dvc_lock_hashes()
        assert v1.tags["dvc.train:artifacts/adapter"] == lock["train:artifacts/adapter"]
        # Clean although the run rewrote the tracked dvc.lock (its hashes are the dvc.* tags above).
        assert len(v1.tags["git_commit"]) == 40 and "git_dirty_files" not in v1.tags, v1.tags["git_commit"]
        gate = json.loads(Path("reports/gate.json").read_text())
        assert gate["interval"]["low"] > 0.5 and gate["checks"] == {
            "improvement": True, "validity": True, "guardrails": True, "forgetting": True, "leak": True}, gate
        leak = gate["candidate_leak"]
        assert len(leak["canaries"]) == 4 and leak["answers_scanned"] > 100 and leak["redacted_values_known"] > 100
        served_dir = registry.download_adapter(p.registry, v1, Path("dl"))
        card = (served_dir / "README.md").read_text()
        assert card.startswith("---\nbase_model: loraflow/builtin-tiny-llama\nlibrary_name: peft")
        # Canary values reach neither the registry nor any report; their hashes do.
        from pipeline.canaries import make_canaries

        run_files = Path(mlflow.artifacts.download_artifacts(run_id=v1.run_id, dst_path="run-artifacts"))
        logged = [q.read_bytes() for q in run_files.rglob("*") if q.is_file()] + [
            q.read_bytes() for q in Path("reports").rglob("*") if q.is_file()]
        for c in make_canaries(p.probes):
            assert not any(c.secret.encode() in blob for blob in logged), "a canary value was written out"
            assert c.digest in card
        mv = registry.client(p.registry).get_model_version(p.project.name, "1")
        assert "## Lineage" in mv.description and "exact_match" in mv.description
        assert v1.tags["task"] == "ticket-triage" and v1.tags["task_kind"] == "json"
        assert any(Path(".dvc-storage").rglob("*")), "dvc push sent nothing to the local remote"
        # The compliance dossier the flow wrote and logged: its numbers are the registry's.
        _check_dossier(p, v1, Path(report["where"]["dossier"]))

        # 2. Unchanged inputs: DVC skips every stage and the same adapter is not registered again.
        again = retrain(params_file="params.yaml")
        assert not any(s["ran"] for s in again["stages"].values()), again["stages"]
        assert again["registered_version"] == 1 and again["newly_registered"] is False

        # 3. A training change re-runs only train and evaluate; the challenger faces the champion.
        _set_params(train={"trl": {**yaml.safe_load(Path("params.yaml").read_text())["train"]["trl"], "seed": 1}})
        third = retrain(params_file="params.yaml")
        ran = {k for k, s in third["stages"].items() if s["ran"]}
        assert ran == {"train", "evaluate"}, third["stages"]  # the always-run task stage found nothing changed
        assert third["registered_version"] == 2
        assert third["decision"]["reference"] == "champion v1"
        if not third["decision"]["promote"]:
            assert third["champion"]["version"] == 1

        # 4. Promotion outside the flow (as in the MLflow UI): serving follows the alias without restart.
        registry.promote(p.registry, p.project.name, 2)
        endpoint.reconcile()  # what the follower's poll or the webhook triggers
        assert endpoint.routes.get(p.project.name).version == 2
        assert {m.id for m in client.models.list().data} == {p.project.name}
        answer = client.chat.completions.create(model=p.project.name, messages=[{
            "role": "user", "content": "The package arrived damaged. This is urgent, please help immediately."}])
        # The answer comes from v2 and is one the task accepts (its quality is the gate's business).
        assert build_task(p.task).check_reference(answer.choices[0].message.content) is None, answer
        # The swap regenerated both dossiers: v1's serving period ended when v2 was served; v2's is open and
        # its approval came through the CLI path.
        from pipeline.layout import serving_log
        from pipeline.release import dossier

        _, _, f2 = dossier.write(p.registry, p.project.name, 2, Path("reports/dossier"), serving_log(p))
        assert f2.serving and f2.serving[-1]["until"] is None
        md2 = Path(f"reports/dossier/{p.project.name}-v2.md").read_text()
        assert "| still serving |" in md2 and "CLI (loraflow promote)" in md2
        _, _, f1 = dossier.write(p.registry, p.project.name, 1, Path("reports/dossier"), serving_log(p))
        assert f1.serving[-1]["ended_by"] == "v2 served"

        # 5. The feedback loop: drifted requests (a category the training data lacks) are answered; a
        # drift-triggered retrain with no feedback waits; users post corrections (by the answer's id);
        # the next one curates them, retrains the adapter only (same base) and gates on both slices.
        import httpx

        drifted = [json.loads(x) for x in Path("data/drift/feature_requests.jsonl").read_text().splitlines()[:30]]
        answers = [client.chat.completions.create(model=p.project.name, messages=r["messages"][:1]) for r in drifted]
        endpoint.log.flush()
        waiting = retrain(params_file="params.yaml", trigger="drift", drift_summary="test drift")
        assert waiting["outcome"] == "waiting_for_feedback", waiting
        assert waiting["message"].startswith("waiting for feedback: 0 of 20"), waiting
        with httpx.Client(base_url=endpoint.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            for a, r in zip(answers[:25], drifted):
                fixed = http.post("/feedback", json={"id": a.id, "thumbs": "down",
                                                     "correction": r["messages"][1]["content"]})
                assert fixed.status_code == 200, fixed.text
        fifth = retrain(params_file="params.yaml", trigger="drift", drift_summary="test drift")
        ran = {k for k, s in fifth["stages"].items() if s["ran"]}
        assert {"curate", "sanitize", "augment", "train", "evaluate"} <= ran and "base" not in ran, fifth["stages"]
        curated = json.loads(Path("reports/curate.json").read_text())
        assert curated["curated"]["by_kind"] == {"correction": 25} and curated["reconciles"], curated
        slices = fifth["decision"]["slices"]
        assert set(slices) == {"original", "curated"} and slices["curated"]["n"] >= 1, fifth["decision"]
        assert any(r.startswith("note: slice curated") for r in fifth["decision"]["reasons"])
        version = registry.client(p.registry).get_model_version(p.project.name, str(fifth["registered_version"]))
        assert version.tags["curated_records"] == "25" and "curated" in json.loads(version.tags["gate_slices"])
        from flows.feedback import feedback_progress

        assert feedback_progress(p)["new"] == 0
    finally:
        endpoint.stop()

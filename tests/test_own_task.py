"""A user's own task, end to end through `loraflow run`: SQL answers over a small schema.

The data is what a new user brings: `prompt`/`completion` JSONL whose answers are programs, many questions
sharing a template and differing in one value (a year, a department, a name), a Cyrillic and Chinese
subset, and the usual defects (an exact re-export, a re-sent question, an answer that is not SQL, a
prompt answered two ways). Every valid distinct record must be kept, the eval split must not be flagged
as contaminated for sharing templates, and evaluate/gate must use the task's own metrics.
"""

import json
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

DEPTS = ["sales", "support", "research", "finance", "legal", "marketing"]
NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov", "Donald Knuth",
         "Frances Allen", "John Backus", "Ken Thompson", "Margaret Hamilton"]


def make_database(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE employees (name TEXT, dept TEXT, year INTEGER, salary INTEGER)")
    rng = random.Random(0)
    rows = [(n, rng.choice(DEPTS), rng.randint(1990, 2025), rng.randint(40, 200) * 1000) for n in NAMES]
    rows += [(f"Person {i}", rng.choice(DEPTS), rng.randint(1990, 2025), rng.randint(40, 200) * 1000)
             for i in range(200)]
    con.executemany("INSERT INTO employees VALUES (?, ?, ?, ?)", rows)
    con.commit()
    con.close()


def distinct_examples() -> list[tuple[str, str]]:
    """Every (question, SQL) pair is a distinct example; most share a template with many others."""
    out = []
    for year in range(1990, 2026):
        out.append((f"How many employees were hired in {year}?",
                    f"SELECT count(*) FROM employees WHERE year = {year}"))
        out.append((f"List the names of employees hired after {year}.",
                    f"SELECT name FROM employees WHERE year > {year}"))
        out.append((f"Сколько сотрудников было нанято в {year} году?",
                    f"SELECT count(*) FROM employees WHERE year = {year}"))
        out.append((f"{year}年入职的员工有多少人？", f"SELECT count(*) FROM employees WHERE year = {year}"))
    for dept in DEPTS:
        out.append((f"What is the average salary in the {dept} department?",
                    f"SELECT avg(salary) FROM employees WHERE dept = '{dept}'"))
        out.append((f"How many people work in {dept}?", f"SELECT count(*) FROM employees WHERE dept = '{dept}'"))
    for name in NAMES:
        out.append((f"Which department does {name} work in?",
                    f"SELECT dept FROM employees WHERE name = '{name}'"))
    return out


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")


@pytest.fixture
def sql_project(project):
    raw = project / "data/raw"
    make_database(raw / "company.db")
    examples = distinct_examples()
    random.Random(1).shuffle(examples)
    n_eval = 60
    eval_, train = examples[:n_eval], examples[n_eval:]
    rec = [{"prompt": q, "completion": a} for q, a in train]
    defects = [
        dict(rec[0]),                                                            # exact re-export
        {"prompt": "  " + rec[1]["prompt"].upper() + " ", "completion": rec[1]["completion"]},  # re-sent
        {"prompt": "Show every employee, please.", "completion": "give me all the rows"},     # not SQL
        {"prompt": "Who earns the most?", "completion": "SELECT name FROM employees ORDER BY salary DESC LIMIT 1"},
        {"prompt": "Who earns the most?", "completion": "SELECT max(salary) FROM employees"},  # conflict
    ]
    write_jsonl(raw / "company_train.jsonl", rec + defects)
    # One eval item really is a training item; the others only share its templates.
    write_jsonl(raw / "company_eval.jsonl", [{"prompt": q, "completion": a} for q, a in eval_] + [rec[5]])
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["project"]["name"] = "company-sql"
    params["task"] = {"name": "company-sql", "kind": "sql", "database": "data/raw/company.db",
                      "description": "Questions about the company's employees answered as SQLite queries.",
                      "max_new_tokens": 40}
    params["data"] = {"train": ["data/raw/company_train.jsonl"], "eval": ["data/raw/company_eval.jsonl"],
                      "preference": "", "generic": "", "validation_fraction": 0.1}
    params["gate"]["metric"] = ""  # the task's primary metric: execution accuracy
    params["augment"]["enabled"] = True
    params["train"]["generic_fraction"] = 0.0
    params["train"]["trl"].update(max_steps=30, per_device_train_batch_size=16, num_train_epochs=1, save_steps=100)
    # The employees are named in questions and answers: personal names would be redacted (and the records
    # differing only in a name would collapse); this user's names are data values, kept by configuration.
    params["sanitize"]["pii"] = {"keep_names": NAMES}
    params["dvc"]["push"] = False
    params["base"]["builtin"]["pretrain_steps"] = 50  # the real pretraining path, short
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    return project, len(train), n_eval


def test_own_sql_task_runs_end_to_end_and_keeps_every_valid_record(sql_project):
    project, n_train, n_eval = sql_project
    env = {**os.environ, "LORAFLOW_DEBUG": "1"}
    env.pop("PREFECT_API_URL", None)  # embedded defaults, as a new user has them
    loraflow = Path(sys.executable).parent / "loraflow"
    res = subprocess.run([str(loraflow), "run", "--json"], cwd=project, env=env, capture_output=True, text=True, timeout=1100)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary, _ = json.JSONDecoder().raw_decode(res.stdout[res.stdout.index('{\n  "stages"'):])

    report = json.loads((project / "reports/sanitize.json").read_text())
    train, eval_ = report["train"], report["eval"]
    assert train["reconciles"] and eval_["reconciles"]
    assert train["kept"] == n_train  # every distinct valid example, templated and non-Latin ones included
    assert train["duplicates"] == {"total": 2, "exact": 1, "near": 1, "contamination": 0}
    assert train["quarantined"]["by_reason"] == {"invalid_answer": 1, "label_conflict": 2}
    assert 0 < train["validation"] < 0.2 * n_train
    assert eval_["kept"] == n_eval and eval_["duplicates"]["contamination"] == 1
    quarantine = [json.loads(x) for x in (project / "data/clean/train/quarantine.jsonl").read_text().splitlines()]
    conflict = [q for q in quarantine if q["reason"] == "label_conflict"]
    assert {q["line"] for q in conflict} == {n_train + 4, n_train + 5}
    assert any(f"company_train.jsonl:{n_train + 4}" in q["detail"] for q in conflict)

    metrics = json.loads((project / "reports/eval/metrics.json").read_text())
    # The task's metrics, then what the gate's guardrails and probes add (speed, canary exposure).
    assert set(metrics["candidate"]) == {"n", "valid", "execution_accuracy", "exact_match", "tokens_per_s",
                                         "max_canary_exposure"}
    assert metrics["candidate"]["n"] == n_eval
    details = json.loads((project / "reports/eval/details.json").read_text())
    assert len(details["candidate"]["per_example"]["execution_accuracy"]) == n_eval
    # Unusable predictions score 0 with a reason instead of stopping evaluate.
    assert all(r for r, v in zip(details["base"]["reasons"], details["base"]["per_example"]["valid"]) if not v)

    decision = summary["decision"]
    assert decision["metric"] == "execution_accuracy"
    assert any(r.startswith(("PASS execution_accuracy ", "FAIL execution_accuracy ")) for r in decision["reasons"])
    assert decision["interval"]["n"] == n_eval
    assert summary["registered_version"] == 1
    card = subprocess.run([str(loraflow), "status"], cwd=project, env=env, capture_output=True, text=True)
    assert "v1" in card.stdout

"""Answer kinds on literal examples: parsing, every metric, unparsable predictions and their reasons."""

import sqlite3

import pytest

from pipeline.config import ConfigError, Params, TaskConfig, parse_params
from pipeline.tasks import build_task
from pipeline.tasks.label import macro_f1

SCHEMA = {"type": "object", "properties": {"category": {"enum": ["billing", "shipping"]}, "priority": {"type": "string"}},
          "required": ["category", "priority"], "additionalProperties": False}


def test_json_scores_and_schema_violations():
    task = build_task(TaskConfig(kind="json", json_schema=SCHEMA))
    ref = '{"category": "billing", "priority": "high"}'
    assert task.score(ref, ref).values == {"valid": 1.0, "json_valid": 1.0, "schema_valid": 1.0,
                                           "exact_match": 1.0, "field_accuracy": 1.0}
    half = task.score('{"priority": "high", "category": "shipping"}', ref)
    assert half.values["field_accuracy"] == 0.5 and half.values["exact_match"] == 0.0
    fenced = task.score('```json\n{"category": "billing", "priority": "high"}\n```', ref)
    assert fenced.values["exact_match"] == 1.0
    bad = task.score('{"category": "refunds", "priority": "high"}', ref)
    assert bad.values["json_valid"] == 1.0 and bad.values["schema_valid"] == 0.0 and bad.values["valid"] == 0.0
    assert "schema violation at category" in bad.reason
    broken = task.score("billing, high", ref)
    assert set(broken.values.values()) == {0.0} and broken.reason.startswith("not valid JSON")
    assert task.check_reference(ref) is None
    assert "schema violation" in task.check_reference('{"category": "billing"}')
    assert "not valid JSON" in task.check_reference("{oops")


def test_json_without_schema_accepts_any_json():
    task = build_task(TaskConfig(kind="json"))
    assert task.score("[1, 2]", "[1, 2]").values["exact_match"] == 1.0
    assert task.check_reference("42") is None


def test_invalid_schema_is_a_config_error():
    with pytest.raises(ConfigError, match="task.json_schema"):
        build_task(TaskConfig(kind="json", json_schema={"type": "no-such-type"}))


def test_text_metrics():
    task = build_task(TaskConfig(kind="text"))
    s = task.score("  The Answer is 42. ", "the answer is 42")
    assert s.values["exact_match"] == 1.0 and s.values["rouge_l"] == pytest.approx(1.0)
    partial = task.score("the answer is 41", "the answer is 42")
    assert partial.values["exact_match"] == 0.0 and 0.5 < partial.values["rouge_l"] < 1.0
    assert 0.0 < partial.values["chrf"] < 1.0
    # Non-Latin text is compared token by token (rouge-score's own tokenizer would drop it).
    assert task.score("东京都", "东京都").values["rouge_l"] == pytest.approx(1.0)
    assert 0 < task.score("东京", "东京都").values["rouge_l"] < 1
    assert task.score("Привет мир", "привет мир").values["exact_match"] == 1.0
    empty = task.score("   ", "x")
    assert empty.values["valid"] == 0.0 and empty.reason == "empty answer"


def test_label_accuracy_macro_f1_and_invalid_labels():
    task = build_task(TaskConfig(kind="label", labels=["positive", "negative", "neutral"]))
    assert task.score("Positive.", "positive").values == {"valid": 1.0, "accuracy": 1.0}
    off = task.score("very good", "positive")
    assert off.values == {"valid": 0.0, "accuracy": 0.0} and "not one of" in off.reason
    refs = ["positive", "negative", "negative", "neutral"]
    scores = [task.score(p, r) for p, r in zip(["positive", "negative", "positive", "bogus"], refs)]
    summary = task.aggregate(scores, refs)
    assert summary["accuracy"] == 0.5 and summary["valid"] == 0.75
    # positive: tp1 fp1 fn0 -> 2/3; negative: tp1 fp0 fn1 -> 2/3; neutral: tp0 -> 0
    assert summary["macro_f1"] == pytest.approx(round(4 / 9, 4))
    assert macro_f1([None], [None]) == 0.0
    assert "not one of" in task.check_reference("maybe")


@pytest.fixture
def shop_db(tmp_path):
    path = tmp_path / "shop.db"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, year INTEGER);
        INSERT INTO users VALUES (1, 'ann', 2021), (2, 'bob', 2022), (3, 'cy', 2022);
    """)
    con.commit()
    con.close()
    return path


def test_sql_execution_accuracy_exact_match_and_failures(shop_db):
    task = build_task(TaskConfig(kind="sql", database=str(shop_db), query_timeout_s=0.5))
    ref = "SELECT name FROM users WHERE year = 2022"
    same = task.score("select NAME from users where year=2022;", ref)
    assert same.values == {"valid": 1.0, "execution_accuracy": 1.0, "exact_match": 1.0}
    # Row order is not part of the answer; a different but equivalent query executes the same.
    other = task.score("SELECT name FROM users WHERE year > 2021 ORDER BY name DESC", ref)
    assert other.values == {"valid": 1.0, "execution_accuracy": 1.0, "exact_match": 0.0}
    wrong = task.score("SELECT name FROM users", ref)
    assert wrong.values["execution_accuracy"] == 0.0
    unparsable = task.score("SELECT FROM WHERE", ref)
    assert unparsable.values["valid"] == 0.0 and "does not parse" in unparsable.reason
    missing = task.score("SELECT nope FROM users", ref)
    assert missing.values["execution_accuracy"] == 0.0 and "execution failed" in missing.reason
    slow = task.score("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c", ref)
    assert slow.values["execution_accuracy"] == 0.0 and "timed out" in slow.reason
    write = task.score("DELETE FROM users", ref)
    assert write.values["valid"] == 0.0 and "not a query" in write.reason
    assert sqlite3.connect(shop_db).execute("SELECT count(*) FROM users").fetchone() == (3,)
    assert "does not parse" in task.check_reference("SELEC name FROM")


def test_sql_needs_its_database(tmp_path):
    with pytest.raises(ConfigError, match="task.database"):
        build_task(TaskConfig(kind="sql", database=str(tmp_path / "missing.db")))


def test_custom_scorer(tmp_path, monkeypatch):
    (tmp_path / "my_scorer.py").write_text(
        "def score(prediction, reference, prompt):\n"
        "    if prediction == 'boom':\n        raise RuntimeError('bad input')\n"
        "    return {'overlap': float(prediction[:1] == reference[:1]), 'reason': 'first letter'}\n")
    monkeypatch.chdir(tmp_path)
    task = build_task(TaskConfig(kind="custom", scorer="my_scorer:score", metrics=["overlap"]))
    assert task.score("abc", "axe").values == {"valid": 1.0, "overlap": 1.0}
    boom = task.score("boom", "axe")
    assert boom.values == {"valid": 0.0, "overlap": 0.0} and "RuntimeError: bad input" in boom.reason
    with pytest.raises(ConfigError, match="task.scorer"):
        build_task(TaskConfig(kind="custom", scorer="no_such_module:fn", metrics=["x"]))


def test_task_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="gate.metric: 'exact_match' is not produced by task kind 'label'"):
        parse_params({"task": {"kind": "label", "labels": ["a", "b"]}, "gate": {"metric": "exact_match"}},
                     source="params.yaml")
    with pytest.raises(ConfigError, match="params.yaml: task.labels: kind label needs at least two distinct labels"):
        parse_params({"task": {"kind": "label", "labels": ["a"]}}, source="params.yaml")
    with pytest.raises(ConfigError, match="task.kind: unknown answer kind 'regex' \\(known: custom, json, label, sql, text"):
        parse_params({"task": {"kind": "regex"}}, source="params.yaml")
    with pytest.raises(ConfigError, match="task.labels: only used with kind label \\(task.kind is text\\)"):
        parse_params({"task": {"kind": "text", "labels": ["a", "b"]}}, source="params.yaml")
    p = parse_params({"task": {"kind": "sql", "database": "x.db"}, "gate": {"metric": ""}}, source="params.yaml")
    assert p.gate_metric == "execution_accuracy"
    assert Params().gate_metric == "exact_match"


NEW_KIND = """
from pipeline.tasks import register
from pipeline.tasks.base import Score, Task


@register
class NumberTask(Task):
    kind = "number"
    metrics_per_example = ("valid", "within_1pct")
    primary = "within_1pct"

    def check_reference(self, answer):
        try:
            float(answer)
        except ValueError:
            return f"{answer[:40]!r} is not a number"
        return None

    def score(self, prediction, reference, prompt=""):
        if self.check_reference(prediction):
            return self.zero(self.check_reference(prediction))
        ok = abs(float(prediction) - float(reference)) <= 0.01 * abs(float(reference))
        return Score({"valid": 1.0, "within_1pct": float(ok)})
"""


def test_a_new_answer_kind_is_one_module(tmp_path, monkeypatch):
    """The README's example: one file with one registered class, and config, gate and scoring all know it."""
    from pipeline import tasks

    monkeypatch.setattr(tasks, "_KINDS", dict(tasks.kinds()))  # leave the real registry as it was
    (tmp_path / "number_kind.py").write_text(NEW_KIND)
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("number_kind")
    p = parse_params({"task": {"kind": "number"}, "gate": {"metric": ""}}, source="params.yaml")
    assert p.task.all_metric_names == ("valid", "within_1pct") and p.gate_metric == "within_1pct"
    task = build_task(p.task)
    assert task.score("100.5", "100").values == {"valid": 1.0, "within_1pct": 1.0}
    assert task.score("abc", "100").reason == "'abc' is not a number"
    with pytest.raises(ConfigError, match="gate.metric: 'exact_match' is not produced by task kind 'number'"):
        parse_params({"task": {"kind": "number"}, "gate": {"metric": "exact_match"}}, source="params.yaml")


def test_every_module_of_the_package_is_a_registered_kind():
    import pkgutil

    from pipeline import tasks
    from pipeline.tasks.base import Task

    modules = {m.name for m in pkgutil.iter_modules(tasks.__path__)} - {"base"}
    kinds = tasks.kinds()
    assert {c.__module__.rsplit(".", 1)[1] for c in kinds.values()} == modules
    for name, cls in kinds.items():
        cfg = {"label": {"labels": ["a", "b"]}, "sql": {"database": "x.db"},
               "custom": {"scorer": "m:f", "metrics": ["m1"]}}.get(name, {})
        task_cfg = TaskConfig(kind=name, **cfg)
        assert task_cfg.primary_metric in task_cfg.all_metric_names, name
        assert task_cfg.metric_names[0] == "valid", name
    with pytest.raises(TypeError, match="registered twice"):
        tasks.register(type("Other", (Task,), {"kind": "json"}))

import json
from pathlib import Path

from pipeline.augment.synthesize import augment
from pipeline.config import AugmentConfig, SanitizeConfig, TaskConfig
from pipeline.data.sanitize import sanitize_files
from pipeline.dedup import record_text

ROOT = Path(__file__).resolve().parents[1]
CHAT = TaskConfig(chat_rewrites=True)


def test_synthetic_records_are_capped_tagged_and_new(tmp_path):
    sanitize_files([ROOT / "data/raw/tickets_train.jsonl"], tmp_path / "clean", SanitizeConfig())
    cfg = AugmentConfig(out_dir=str(tmp_path / "aug"), max_synthetic_fraction=0.1)
    report = augment(tmp_path / "clean/clean.jsonl", cfg, CHAT)
    rows = [json.loads(x) for x in (tmp_path / "aug/train.jsonl").read_text().splitlines()]
    real = [r for r in rows if "provenance" not in r]
    synth = [r for r in rows if "provenance" in r]
    assert report["synthetic"] == len(synth) <= int(0.1 * len(real))
    assert len(synth) > 0.8 * int(0.1 * len(real))
    assert all(s["provenance"]["synthetic"] and s["provenance"]["generator"].startswith("rule:")
               and s["provenance"]["parent"]["line"] > 0 for s in synth)
    keys = [record_text(r["messages"]) for r in rows]
    assert len(keys) == len(set(keys))
    # Labels are preserved: the parent's answer is the synthetic record's answer.
    by_line = {r["source"]["line"]: r for r in real}
    assert all(s["messages"][-1] == by_line[s["provenance"]["parent"]["line"]]["messages"][-1] for s in synth)


def test_disabled_augment_writes_real_records_only(tmp_path):
    sanitize_files([ROOT / "data/raw/tickets_train.jsonl"], tmp_path / "clean", SanitizeConfig())
    report = augment(tmp_path / "clean/clean.jsonl", AugmentConfig(out_dir=str(tmp_path / "aug"), enabled=False), CHAT)
    assert report["synthetic"] == 0 and report["total"] == report["real"]


def test_chat_rules_only_where_the_task_says_so(tmp_path):
    sanitize_files([ROOT / "data/raw/tickets_train.jsonl"], tmp_path / "clean", SanitizeConfig())
    report = augment(tmp_path / "clean/clean.jsonl", AugmentConfig(out_dir=str(tmp_path / "aug")), TaskConfig())
    assert report["synthetic"] == 0 and "chat_rewrites" in report["why_none"]


def test_rewrites_never_touch_answers_or_line_breaks(tmp_path):
    clean = tmp_path / "clean.jsonl"
    prompt = "Hi team, the export fails. It started today.\nSteps:\n1. open the page\n2. click export"
    with open(clean, "w") as fh:
        for i in range(60):
            msgs = [{"role": "user", "content": f"{prompt} (case {i})"},
                    {"role": "assistant", "content": f"line one {i}\n  indented line two"}]
            fh.write(json.dumps({"messages": msgs, "source": {"file": "x", "line": i + 1}}) + "\n")
    report = augment(clean, AugmentConfig(out_dir=str(tmp_path / "aug"), max_synthetic_fraction=0.5), CHAT)
    rows = [json.loads(x) for x in (tmp_path / "aug/train.jsonl").read_text().splitlines()]
    synth = [r for r in rows if "provenance" in r]
    assert report["synthetic"] == len(synth) > 0
    for s in synth:
        parent = rows[s["provenance"]["parent"]["line"] - 1]
        assert s["messages"][-1] == parent["messages"][-1]
        new, old = s["messages"][0]["content"].split("\n"), parent["messages"][0]["content"].split("\n")
        assert len(new) == len(old) and new[1:-1] == old[1:-1] and new[-1].startswith(old[-1])

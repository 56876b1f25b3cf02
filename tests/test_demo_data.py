import json
from pathlib import Path

from pipeline.data.demo import generate, generate_generic, generate_preferences

ROOT = Path(__file__).resolve().parents[1]


def test_committed_demo_data_is_what_the_generator_produces():
    train, eval_ = generate()
    assert (ROOT / "data/raw/tickets_train.jsonl").read_text(encoding="utf-8") == "\n".join(train) + "\n"
    assert (ROOT / "data/raw/tickets_eval.jsonl").read_text(encoding="utf-8") == "\n".join(eval_) + "\n"
    assert (ROOT / "data/raw/generic_chat.jsonl").read_text(encoding="utf-8") == "\n".join(generate_generic()) + "\n"
    assert (ROOT / "data/raw/tickets_preference.jsonl").read_text(encoding="utf-8") == \
        "\n".join(generate_preferences()) + "\n"


def test_demo_data_has_the_defects_real_data_has():
    train, _ = generate()
    text = "\n".join(train)
    assert "@example" in text and "+44 20" in text and "4111 1111 1111 1111" in text
    assert len(train) != len(set(train))  # exact duplicates
    bad = 0
    for line in train:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            bad += 1
    assert bad >= 2

"""The sanitize stage: one test per defect class, PII placeholders and counts, reconciliation."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import SanitizeConfig
from pipeline.data.sanitize import NoValidRecords, index_from_file, sanitize_files

ROOT = Path(__file__).resolve().parents[1]
CFG = SanitizeConfig(max_chars=200, max_depth=8)


def rec(user: str, answer: str = '{"category": "billing", "priority": "low"}') -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})


def run(tmp_path, lines: list[str] | bytes, cfg=CFG, name="in.jsonl"):
    f = tmp_path / name
    if isinstance(lines, bytes):
        f.write_bytes(lines)
    else:
        f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return sanitize_files([f], tmp_path / "out", cfg), f


def quarantine(tmp_path):
    return [json.loads(x) for x in (tmp_path / "out/quarantine.jsonl").read_text().splitlines()]


DEEP = '{"messages": [{"role": "user", "content": "hi", "x": ' + "[" * 20 + "]" * 20 + '}]}'


@pytest.mark.parametrize("line, reason", [
    ("not json", "invalid_json"),
    ('{"messages": [{"role": "user", "content": "hi"}', "truncated_json"),
    ('{"messages": [{"role": "user", "content": "unterminated', "truncated_json"),
    ("[1, 2]", "not_an_object"),
    ('{"text": "x"}', "unknown_format"),
    ('{"messages": "hello"}', "wrong_type"),
    ('{"messages": []}', "empty_conversation"),
    ('{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown_role"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}', "wrong_type"),
    ('{"messages": [{"role": "user", "content": "  \\u200b "}, {"role": "assistant", "content": "y"}]}', "blank_content"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no_assistant_turn"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "no_user_turn"),
    ('{"messages": [{"role": "user", "content": "a\\u0000b"}, {"role": "assistant", "content": "y"}]}', "control_characters"),
    ('{"messages": [{"role": "user", "content": "bell\\u0007"}, {"role": "assistant", "content": "y"}]}', "control_characters"),
    (DEEP, "too_deep"),
    ("[" * 100000 + "]" * 100000, "too_deep"),
    (rec("x" * 300), "too_long"),
    ("", "blank_line"),
    ("   ", "blank_line"),
])
def test_each_defect_is_quarantined_with_its_reason_and_line(tmp_path, line, reason):
    report, f = run(tmp_path, [rec("Hello there"), line])
    assert report["quarantined"]["by_reason"] == {reason: 1}
    q = quarantine(tmp_path)[0]
    assert (q["line"], q["source"], q["reason"]) == (2, str(f), reason) and q["detail"]
    assert report["reconciles"] and report["kept"] == 1


def test_invalid_utf8_is_quarantined_per_line(tmp_path):
    report, _ = run(tmp_path, rec("ok").encode() + b"\n" + b'{"messages": "\xff\xfe"}\n' + rec("fine").encode() + b"\n")
    assert report["kept"] == 2 and report["quarantined"]["by_reason"] == {"invalid_utf8": 1}
    assert quarantine(tmp_path)[0]["line"] == 2


def test_bom_and_crlf_are_repaired_and_counted(tmp_path):
    report, _ = run(tmp_path, b"\xef\xbb\xbf" + rec("first").encode() + b"\r\n" + rec("second").encode() + b"\r\n")
    assert report["kept"] == 2 and report["repairs"] == {"bom": 1, "crlf": 2}


# Text as people write it in ten scripts, with the characters NFKC or format stripping would change.
AS_WRITTEN = [
    "x² + ½ = ?", "می\u200cخواهم سفارشم را لغو کنم", "family 👨\u200d👩\u200d👧 and flag 🏳\ufe0f\u200d🌈",
    "Ｆｕｌｌwidth ｑｕｅｒｙ", "заказ №５ не пришёл", "我的订单还没到，请帮忙查一下", "注文がまだ届きません",
    "주문이 아직 도착하지 않았습니다", "הזמנה שלי לא הגיעה", "मेरा ऑर्डर अभी तक नहीं आया", "Η παραγγελία μου δεν έφτασε",
    "ﬁnal invoice\u00a0total", "e\u0301clair (decomposed)", "  leading and trailing spaces  \n",
]


@pytest.mark.parametrize("text", AS_WRITTEN)
def test_stored_text_is_the_users_character_for_character(tmp_path, text):
    run(tmp_path, [rec(text, answer=text + " ⁵")])
    stored = json.loads((tmp_path / "out/clean.jsonl").read_text())["messages"]
    assert [m["content"] for m in stored] == [text, text + " ⁵"]


def test_invisible_and_compatibility_characters_do_not_make_a_new_record(tmp_path):
    report, _ = run(tmp_path, [rec("Ｆｕｌｌwidth zero\u200bwidth"), rec("Fullwidth zerowidth")])
    assert report["kept"] == 1 and report["duplicates"]["exact"] == 1


def test_a_zero_width_joiner_inside_an_email_does_not_let_it_through(tmp_path):
    run(tmp_path, [rec("write to jo\u200dhn.smith@exa\u200cmple.com, x² stays")])
    text = json.loads((tmp_path / "out/clean.jsonl").read_text())["messages"][0]["content"]
    assert text == "write to <EMAIL>, x² stays"


def test_the_same_json_answer_in_other_whitespace_is_one_record_not_a_conflict(tmp_path):
    from pipeline.config import TaskConfig
    from pipeline.tasks import build_task

    task = build_task(TaskConfig(kind="json"))
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join([rec("where is my parcel", '{"category": "shipping", "priority": "high"}'),
                            rec("where is my parcel", '{ "priority":"high",\n  "category":"shipping" }'),
                            rec("refund me", '{"category": "billing"}'),
                            rec("refund me", '{"category": "refund"}')]) + "\n")
    report = sanitize_files([f], tmp_path / "out", CFG, task=task)
    assert report["duplicates"]["exact"] == 1
    assert report["quarantined"]["by_reason"] == {"label_conflict": 2} and report["kept"] == 1


def test_labels_that_parse_the_same_are_the_same_answer(tmp_path):
    from pipeline.config import TaskConfig
    from pipeline.tasks import build_task

    task = build_task(TaskConfig(kind="label", labels=["billing", "shipping"]))
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join([rec("parcel late", "shipping"), rec("parcel late", " Shipping.")]) + "\n")
    report = sanitize_files([f], tmp_path / "out", CFG, task=task)
    assert report["kept"] == 1 and report["duplicates"]["exact"] == 1 and not report["quarantined"]["total"]


def test_zero_width_characters_cannot_hide_pii(tmp_path):
    run(tmp_path, [rec("reach me at jane\u200b.doe@exa\u200dmple.com or 4111\u200b 1111 1111 1111")])
    text = (tmp_path / "out/clean.jsonl").read_text()
    assert "<EMAIL>" in text and "<CARD>" in text and "jane" not in text


def test_pii_is_replaced_and_counted_by_type(tmp_path):
    report, _ = run(tmp_path, [rec("Mail jane.doe@example.com or call +44 20 7946 0958, card 4111 1111 1111 1111."),
                               rec("IBAN GB82 WEST 1234 5698 7654 32, SSN 123-45-6789, from 10.1.2.3")],
                    cfg=SanitizeConfig())
    text = (tmp_path / "out/clean.jsonl").read_text()
    for leaked in ("jane.doe", "7946", "4111", "GB82", "6789", "10.1.2.3"):
        assert leaked not in text
    assert report["redactions"]["by_type"] == {"CARD": 1, "EMAIL": 1, "IBAN": 1, "IP_ADDRESS": 1, "PHONE": 1, "SSN": 1}


def test_custom_patterns_from_config(tmp_path):
    cfg = SanitizeConfig(custom_pii={"employee_id": r"\bEMP-\d{5}\b"})
    report, _ = run(tmp_path, [rec("ask EMP-12345 about ORD-12345")], cfg=cfg)
    text = (tmp_path / "out/clean.jsonl").read_text()
    assert "<EMPLOYEE_ID>" in text and "ORD-12345" in text and report["redactions"]["by_type"] == {"EMPLOYEE_ID": 1}


def test_exact_near_and_contamination_duplicates(tmp_path):
    train = ["My parcel for order ORD-1 is late, tracking shows nothing since monday",
             "My parcel for order ORD-1 is late, tracking shows nothing since monday",
             "MY PARCEL for order ORD-1 is LATE!!  Tracking shows nothing since Monday."]
    report, f = run(tmp_path, [rec(t) for t in train])
    d = report["duplicates"]
    assert (report["kept"], d["exact"], d["near"]) == (1, 1, 1)
    index = index_from_file(tmp_path / "out/clean.jsonl", CFG)
    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join([rec("my parcel for order ORD-1 is late; tracking shows nothing since monday"),
                             rec("Refund please, I was charged twice")]) + "\n")
    r = sanitize_files([ev], tmp_path / "eval", CFG, reference=index)
    assert r["kept"] == 1 and r["duplicates"]["contamination"] == 1


def test_near_duplicate_detection_can_be_switched_off(tmp_path):
    lines = [rec("My parcel is late, nothing since monday"), rec("MY PARCEL is late!! Nothing since Monday.")]
    report, _ = run(tmp_path, lines, cfg=SanitizeConfig(near_duplicates=False))
    assert report["kept"] == 2


lines = st.lists(st.one_of(
    st.sampled_from([rec("same ticket"), rec("SAME   ticket!"), "garbage", '{"messages": []}', "", "[1]"]),
    st.text(alphabet="abc xyz@.1", min_size=1, max_size=12).map(rec),
    st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(content=lines)
def test_every_record_is_accounted_for(tmp_path_factory, content):
    d = tmp_path_factory.mktemp("recon")
    f = d / "in.jsonl"
    text = "\n".join(c.replace("\n", " ").replace("\r", " ") for c in content) + "\n"
    f.write_text(text, encoding="utf-8")
    try:
        r = sanitize_files([f], d / "out", CFG)
    except NoValidRecords:
        r = json.loads((d / "out/report.json").read_text())
    assert r["read"] == len(content)
    assert r["read"] == r["kept"] + r["quarantined"]["total"] + r["duplicates"]["total"]
    # JSONL is split on "\n" only; str.splitlines would also split on U+0085 and U+2028 inside text.
    assert (d / "out/clean.jsonl").read_text().count("\n") == r["kept"]
    assert (d / "out/quarantine.jsonl").read_text().count("\n") == r["quarantined"]["total"]


def test_no_valid_record_is_an_error_naming_the_file(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text("nope\n{}\n")
    with pytest.raises(NoValidRecords, match="bad.jsonl: no valid record in 2 lines"):
        sanitize_files([f], tmp_path / "out", CFG)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(NoValidRecords, match="input is empty"):
        sanitize_files([empty], tmp_path / "out2", CFG)


def test_demo_data_sanitizes_with_reconciled_counts(tmp_path):
    r = sanitize_files([ROOT / "data/raw/tickets_train.jsonl"], tmp_path, SanitizeConfig())
    assert r["reconciles"] and r["quarantined"]["total"] == 7
    assert r["duplicates"]["exact"] >= 30 and r["duplicates"]["near"] >= 25
    assert r["redactions"]["by_type"].keys() == {"EMAIL", "PHONE", "CARD", "NAME"}  # names in sign-offs
    assert (tmp_path / "data_card.md").read_text().startswith("# Data card")


def test_label_conflicts_quarantine_every_record_naming_the_first(tmp_path):
    lines = [rec("is my card charged twice?", "yes"), rec("other question", "x"),
             rec("is my card charged twice?", "no"), rec("is my card charged twice?", "yes")]
    report, f = run(tmp_path, lines)
    assert report["kept"] == 1 and report["quarantined"]["by_reason"] == {"label_conflict": 3}
    assert report["reconciles"] and report["per_source"][str(f)] == {"read": 4, "kept": 1, "quarantined": 3}
    q = {e["line"]: e for e in map(json.loads, (tmp_path / "out/quarantine.jsonl").read_text().splitlines())}
    assert set(q) == {1, 3, 4} and all(e["reason"] == "label_conflict" for e in q.values())
    assert f"same prompt as {f}:1" in q[3]["detail"] and "2 later record(s)" in q[1]["detail"]
    assert [json.loads(x)["source"]["line"] for x in (tmp_path / "out/clean.jsonl").read_text().splitlines()] == [2]


def test_answers_that_do_not_fit_the_task_are_quarantined(tmp_path):
    from pipeline.config import TaskConfig
    from pipeline.tasks import build_task

    f = tmp_path / "in.jsonl"
    f.write_text("\n".join([rec("a", "positive"), rec("b", "sort of"), rec("c", "negative")]) + "\n")
    task = build_task(TaskConfig(kind="label", labels=["positive", "negative"]))
    r = sanitize_files([f], tmp_path / "out", CFG, task=task)
    assert r["kept"] == 2 and r["quarantined"]["by_reason"] == {"invalid_answer": 1}
    entry = json.loads((tmp_path / "out/quarantine.jsonl").read_text())
    assert entry["line"] == 2 and "not one of" in entry["detail"]


def test_quarantine_never_stores_pii_unredacted(tmp_path):
    report, _ = run(tmp_path, ['{"messages": [{"role": "user", "content": "mail jane.doe@example.com"}]}', rec("ok")])
    assert report["quarantined"]["total"] == 1
    text = (tmp_path / "out/quarantine.jsonl").read_text()
    assert "jane.doe@example.com" not in text and "<EMAIL>" in text


def test_validation_split_is_deterministic_and_disjoint(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(rec(f"question number {i} about topic {i * 7}") for i in range(400)) + "\n")
    outs = []
    for run_ in ("a", "b"):
        r = sanitize_files([f], tmp_path / run_, CFG, validation_fraction=0.1)
        outs.append((tmp_path / run_ / "validation.jsonl").read_text())
        assert r["kept"] == 400 and 20 <= r["validation"] <= 60 and r["clean"] + r["validation"] == 400
    assert outs[0] == outs[1]
    train = set((tmp_path / "a/clean.jsonl").read_text().splitlines())
    assert not train & set(outs[0].splitlines())

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import SanitizeConfig
from pipeline.pii import luhn_ok, redact
from pipeline.sanitize import NoValidRecords, reference_keys, sanitize_files

ROOT = Path(__file__).resolve().parents[1]
CFG = SanitizeConfig(max_chars=200)


def rec(user: str, answer: str = '{"category": "billing", "priority": "low"}') -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})


@pytest.mark.parametrize("line, reason", [
    ("not json", "invalid_json"),
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid_json"),
    ("[1, 2]", "not_an_object"),
    ('{"prompt": "x"}', "missing_messages"),
    ('{"messages": "hello"}', "wrong_type"),
    ('{"messages": []}', "empty_conversation"),
    ('{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown_role"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}', "wrong_type"),
    ('{"messages": [{"role": "user", "content": "  \\u200b "}, {"role": "assistant", "content": "y"}]}', "blank_content"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no_assistant_turn"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "no_user_turn"),
    (rec("x" * 300), "too_long"),
    ("", "blank_line"),
])
def test_each_defect_is_quarantined_with_its_reason_and_line(tmp_path, line, reason):
    f = tmp_path / "in.jsonl"
    f.write_text(rec("Hello there") + "\n" + line + "\n", encoding="utf-8")
    report = sanitize_files([f], tmp_path / "out", CFG)
    assert report["quarantined"]["by_reason"] == {reason: 1}
    q = [json.loads(x) for x in (tmp_path / "out/quarantine.jsonl").read_text().splitlines()]
    assert q[0]["line"] == 2 and q[0]["source"] == str(f) and q[0]["reason"] == reason
    assert report["reconciles"]


def test_invalid_utf8_is_quarantined_not_fatal(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_bytes(rec("ok").encode() + b"\n" + b'{"messages": "\xff\xfe"}\n')
    report = sanitize_files([f], tmp_path / "out", CFG)
    assert report["kept"] == 1 and report["quarantined"]["by_reason"] == {"invalid_utf8": 1}


def test_bom_and_crlf_are_accepted(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + rec("first").encode() + b"\r\n" + rec("second").encode() + b"\r\n")
    assert sanitize_files([f], tmp_path / "out", CFG)["kept"] == 2


def test_pii_is_replaced_with_typed_placeholders_and_counted(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text(rec("Mail jane.doe@example.com or call +44 20 7946 0958, card 4111 1111 1111 1111.") + "\n")
    report = sanitize_files([f], tmp_path / "out", CFG)
    text = (tmp_path / "out/clean.jsonl").read_text()
    assert "jane.doe" not in text and "7946" not in text and "4111" not in text
    assert "<EMAIL>" in text and "<PHONE>" in text and "<CARD>" in text
    assert report["redactions"]["by_type"] == {"CARD": 1, "EMAIL": 1, "PHONE": 1}


@pytest.mark.parametrize("text", [
    "Order ORD-48192 is late", "Version 1.20.3 broke sync", "Invoice 2024-03-15 for $1,299.00",
    "Ticket #123456 reopened", "Card-like but fails Luhn: 4111 1111 1111 1112",
])
def test_non_pii_numbers_survive(text):
    assert redact(text) == (text, {})


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112")


@settings(max_examples=60, deadline=None)
@given(user=st.emails())
def test_any_email_is_redacted(user):
    out, counts = redact(f"write to {user} today")
    assert user not in out and counts["EMAIL"] == 1


def test_zero_width_characters_cannot_hide_an_email(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text(rec("reach me at jane\u200b.doe@exa\u200dmple.com") + "\n", encoding="utf-8")
    sanitize_files([f], tmp_path / "out", CFG)
    assert "<EMAIL>" in (tmp_path / "out/clean.jsonl").read_text()


lines = st.lists(st.one_of(
    st.sampled_from([rec("same ticket"), rec("SAME   ticket!"), "garbage", '{"messages": []}', ""]),
    st.text(alphabet="abc xyz", min_size=1, max_size=12).map(rec),
), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None)
@given(content=lines)
def test_every_record_is_accounted_for(tmp_path_factory, content):
    d = tmp_path_factory.mktemp("recon")
    f = d / "in.jsonl"
    f.write_text("\n".join(content) + "\n", encoding="utf-8")
    try:
        r = sanitize_files([f], d / "out", CFG)
    except NoValidRecords:
        r = json.loads((d / "out/report.json").read_text())
    assert r["read"] == len(content)
    assert r["read"] == r["kept"] + r["quarantined"]["total"] + r["duplicates"]["total"]
    assert len((d / "out/clean.jsonl").read_text().splitlines()) == r["kept"]
    assert len((d / "out/quarantine.jsonl").read_text().splitlines()) == r["quarantined"]["total"]


def test_exact_near_and_contamination_duplicates(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join([rec("My parcel is late"), rec("My parcel is late"), rec("MY PARCEL  is late!")]) + "\n")
    r = sanitize_files([train], tmp_path / "train", CFG)
    assert (r["kept"], r["duplicates"]["exact"], r["duplicates"]["near"]) == (1, 1, 1)
    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join([rec("my parcel is LATE"), rec("Refund please")]) + "\n")
    r = sanitize_files([ev], tmp_path / "eval", CFG, reference_keys(tmp_path / "train/clean.jsonl"))
    assert r["kept"] == 1 and r["duplicates"]["contamination"] == 1


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
    assert r["redactions"]["by_type"].keys() == {"EMAIL", "PHONE", "CARD"}
    assert (tmp_path / "data_card.md").read_text().startswith("# Data card")

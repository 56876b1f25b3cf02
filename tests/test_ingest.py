"""Every input format users have comes out as the same chat records, with source positions."""

import json

import pytest

from pipeline.config import ColumnMap, SanitizeConfig
from pipeline.data.ingest import UnsupportedInput, read_records
from pipeline.data.records import RecordError, to_messages
from pipeline.data.sanitize import NoValidRecords, sanitize_files

EXPECTED = [{"role": "user", "content": "Where is my parcel?"}, {"role": "assistant", "content": "On its way."}]


@pytest.mark.parametrize("obj", [
    {"messages": EXPECTED},
    {"prompt": "Where is my parcel?", "completion": "On its way."},
    {"prompt": [EXPECTED[0]], "completion": [EXPECTED[1]]},
    {"instruction": "Where is my parcel?", "input": "", "output": "On its way."},
    {"conversations": [{"from": "human", "value": "Where is my parcel?"}, {"from": "gpt", "value": "On its way."}]},
])
def test_jsonl_shapes_become_chat_messages(tmp_path, obj):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps(obj) + "\n")
    (rec,) = list(read_records(f, ColumnMap()))
    assert (rec.source, rec.line) == (str(f), 1)
    assert to_messages(rec.value, 1000, 10) == EXPECTED


def test_alpaca_input_and_system_are_kept():
    msgs = to_messages({"instruction": "Classify.", "input": "My card was declined", "output": "billing",
                        "system": "You triage tickets."}, 1000, 10)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[1]["content"] == "Classify.\n\nMy card was declined"


def test_csv_with_column_mapping_and_row_numbers(tmp_path):
    f = tmp_path / "tickets.csv"
    f.write_text('question,answer,extra\n"Where is my parcel?","On its way.",x\n"Hi","",y\n', encoding="utf-8")
    cols = ColumnMap(prompt="question", completion="answer")
    recs = list(read_records(f, cols))
    assert [r.line for r in recs] == [1, 2]
    assert to_messages(recs[0].value, 1000, 10) == EXPECTED
    with pytest.raises(RecordError, match="blank_content"):
        to_messages(recs[1].value, 1000, 10)


def test_csv_missing_column_is_quarantined_with_the_key(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("q,a\nx,y\n")
    cfg = SanitizeConfig(columns=ColumnMap(prompt="question", completion="a"))
    with pytest.raises(NoValidRecords, match=r"no valid record in 1 lines \(missing_column=1\)"):
        sanitize_files([f], tmp_path / "out", cfg)
    q = json.loads((tmp_path / "out/quarantine.jsonl").read_text())
    assert q["reason"] == "missing_column" and "sanitize.columns.prompt" in q["detail"]


def test_csv_invalid_utf8_row_is_quarantined_alone(tmp_path):
    f = tmp_path / "t.csv"
    f.write_bytes(b"prompt,completion\nok,fine\nbad \xff,x\nalso ok,yes\n")
    report = sanitize_files([f], tmp_path / "out", SanitizeConfig())
    assert report["kept"] == 2 and report["quarantined"]["by_reason"] == {"invalid_utf8": 1}


def test_parquet_streams_in_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 5000
    table = pa.table({"instruction": [f"ticket {i}: where is order {i}?" for i in range(n)],
                      "output": ["shipping"] * n})
    f = tmp_path / "t.parquet"
    pq.write_table(table, f, row_group_size=1000)
    recs = read_records(f, ColumnMap())
    first = next(recs)
    assert first.line == 1 and first.value["instruction"].startswith("ticket 0")
    report = sanitize_files([f], tmp_path / "out", SanitizeConfig(near_duplicates=False))
    assert report["read"] == n and report["kept"] == n


def test_messages_column_holding_json_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "m.parquet"
    pq.write_table(pa.table({"chat": [json.dumps(EXPECTED)]}), f)
    (rec,) = list(read_records(f, ColumnMap(messages="chat")))
    assert to_messages(rec.value, 1000, 10) == EXPECTED


def test_hf_dataset_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list([{"prompt": "Where is my parcel?", "completion": "On its way."}] * 3)
    DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    recs = list(read_records(tmp_path / "ds", ColumnMap()))
    assert len(recs) == 3 and recs[2].source.endswith("ds[train]") and recs[2].line == 3
    assert to_messages(recs[0].value, 1000, 10) == EXPECTED


def test_unsupported_inputs_fail_clearly(tmp_path):
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(UnsupportedInput, match=r"x\.xml: unsupported format '\.xml'"):
        read_records(tmp_path / "x.xml", ColumnMap())
    (tmp_path / "d").mkdir()
    with pytest.raises(UnsupportedInput, match="not one saved by datasets.save_to_disk"):
        read_records(tmp_path / "d", ColumnMap())
    with pytest.raises(FileNotFoundError, match="missing.jsonl: input file not found"):
        read_records(tmp_path / "missing.jsonl", ColumnMap())


def test_several_inputs_are_reported_per_source(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    a.write_text(json.dumps({"messages": EXPECTED}) + "\nbroken\n")
    b.write_text("prompt,completion\nAnother question?,Another answer.\n")
    report = sanitize_files([a, b], tmp_path / "out", SanitizeConfig())
    assert report["per_source"] == {str(a): {"read": 2, "kept": 1, "quarantined": 1}, str(b): {"read": 1, "kept": 1}}

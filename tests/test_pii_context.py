"""Contextual personal data: names, addresses, dates of birth, id numbers; what must survive; the same
redaction in every place text is stored; the leak probe's key; the optional model recogniser."""

import json
from pathlib import Path

import pytest

from pipeline.pii import DigestKeyMismatch, mask_secrets, read_digests, redact, write_digests


@pytest.mark.parametrize("text, kind, gone", [
    ("Hello, my name is Maria Gonzalez and I need help.", "NAME", "Gonzalez"),
    ("Best regards,\nJohn Smith", "NAME", "Smith"),
    ("Thanks,\nAnna", "NAME", "Anna"),
    ("Kind regards\n\nPeter Müller\nHead of Sales", "NAME", "Müller"),
    ("Kind regards,\n\nZorvath Quellin\nCustomer", "NAME", "Quellin"),  # a name no list knows
    ("Dear Mrs. Okafor, your refund is on its way", "NAME", "Okafor"),
    ("Name: Émilie Dubois", "NAME", "Dubois"),
    ("Hi Jordan, the app crashes", "NAME", "Jordan"),
    ("I'm Sarah from accounting", "NAME", "Sarah"),
    ("Yesterday John A. Smith called about order 12345", "NAME", "Smith"),
    ("Mein Name ist Karsten Wieloch-Bolnbach", "NAME", "Wieloch"),
    ("je m'appelle Camille Rousseau", "NAME", "Rousseau"),
    ("меня зовут Иван Петров", "NAME", "Петров"),
    ("我叫王伟。", "NAME", "王伟"),
    ("ship it to 221B Baker Street, London NW1 6XE please", "ADDRESS", "Baker"),
    ("I live at 7631 Johnson Village Suite 690, Adamsbury, OR 13900.", "ADDRESS", "13900"),
    ("send to 1600 Pennsylvania Ave NW, Washington, DC 20500", "ADDRESS", "1600"),
    ("Adresse: Hauptstraße 5, 10115 Berlin", "ADDRESS", "Hauptstraße"),
    ("livraison au 8, avenue Manon Gillet\n97636 Sainte Antoinenec", "ADDRESS", "Gillet"),
    ("Viale Parisi, 171 Appartamento 47\n44019, Montesanto (FE)", "ADDRESS", "Parisi"),
    ("P.O. Box 4471, Springfield, IL 62704", "ADDRESS", "4471"),
    ("date of birth 10/09/1967", "DOB", "1967"),
    ("DOB: 1985-03-14", "DOB", "1985"),
    ("I was born on March 3, 1990", "DOB", "1990"),
    ("geboren am 3. Mai 1971", "DOB", "1971"),
    ("passport H87366851", "ID_NUMBER", "H87366851"),
    ("Reisepassnummer XV8064888", "ID_NUMBER", "XV8064888"),
    ("my driver's license number is D1234-5678-9012", "ID_NUMBER", "5678"),
    ("NI number QQ 12 34 56 C", "ID_NUMBER", "34 56"),
    ("codice fiscale RGNLLR83P01M163M", "ID_NUMBER", "RGNLLR83P01M163M"),
    ("mi DNI es 12345678Z", "ID_NUMBER", "12345678Z"),
    ("NIR 2 77 01 89 024 457 32", "ID_NUMBER", "457"),
])
def test_contextual_values_are_redacted(text, kind, gone):
    out, counts = redact(text)
    assert counts.get(kind, 0) >= 1 and gone not in out, (out, counts)


@pytest.mark.parametrize("text", [
    "our Paris office opens on Monday in May",
    "I bought the Microsoft Surface Pro and an Apple Watch",
    "Albert Einstein's theory of relativity",
    "Morgan Stanley Bank raised its forecast",
    "Dear Customer, we received your order",
    "Hi team, Pages load slowly since Tuesday",
    "I'm Still waiting for the June invoice",
    "Call me ASAP please",
    "We ran 3 Data Center migrations and 2 Key Vault rotations",
    "Liebe Grüße, Spring 2024 release on Firewall 2",
    "The meeting is on 10/09/2026 at 14:00",
    "Released on March 3, 1990 as version 1.0",
    "passport renewal takes 6 weeks",
    "UPS tracking 1Z 999 AA1 01 2345 6784 shows delayed",
    "parcel RR 123 456 785 GB is in customs",
    "Thanks, the fix works",
    "Regards,\nThe Support Team",
    "Version 12 Main branch is green",
    "Taylor Swift tickets sold out in minutes",
    "The London and New York offices are closed on Friday",
])
def test_look_alikes_of_the_contextual_types_survive(text):
    assert redact(text) == (text, {}), redact(text)


def test_a_tracking_number_is_not_partly_a_phone():
    out, counts = redact("UPS 1Z 999 AA1 01 2345 6784, call +44 20 7946 0958")
    assert out == "UPS 1Z 999 AA1 01 2345 6784, call <PHONE>" and counts == {"PHONE": 1}


def test_keep_names_and_switches_come_from_config():
    from pipeline.config import SanitizeConfig
    from pipeline.pii import build_redactor

    cfg = SanitizeConfig(pii={"keep_names": ["Grace Hopper"], "addresses": False})
    r = build_redactor(cfg)
    assert redact("Grace Hopper wrote the first compiler", r)[1] == {}
    assert redact("my name is Grace Hopper", r)[1] == {"NAME": 1}  # a personal cue still wins
    assert redact("ship to 221B Baker Street, London NW1 6XE", r)[1] == {}
    with pytest.raises(ValueError, match="name_locales"):
        SanitizeConfig(pii={"name_locales": ["xx_YY"]})


def test_redaction_keeps_every_other_character_as_written():
    text = "x² + ½, می\u200cخواهم, 👨\u200d👩\u200d👧 — mail jo\u200dhn@exam\u200cple.com"
    assert redact(text)[0] == "x² + ½, می\u200cخواهم, 👨\u200d👩\u200d👧 — mail <EMAIL>"


def test_config_secrets_are_masked_before_logging():
    cfg = {"train": {"trl": {"hub_token": "hf_secret", "max_length": 160}},
           "serve": {"env": {"HF_TOKEN": "hf_other"}, "max_tokens": 256},
           "platform": {"database_url": "postgresql://loraflow:pw0rd@db:5432/x", "api_key": "k-123"}}
    masked = json.dumps(mask_secrets(cfg))
    for secret in ("hf_secret", "hf_other", "pw0rd", "k-123"):
        assert secret not in masked
    assert '"max_length": 160' in masked and '"max_tokens": 256' in masked


def test_digests_written_under_another_key_are_refused(tmp_path):
    f = tmp_path / "pii_digests.txt"
    write_digests(f, {"ab" * 16}, b"key-one")
    assert read_digests([f], b"key-one") == {"ab" * 16}
    with pytest.raises(DigestKeyMismatch, match="different PII key"):
        read_digests([f], b"key-two")
    f.write_text("ab" * 16 + "\n")  # an unkeyed file cannot be checked either
    with pytest.raises(DigestKeyMismatch):
        read_digests([f], b"key-one")


def test_the_request_log_uses_the_configured_redactor(tmp_path):
    from pipeline.config import SanitizeConfig
    from pipeline.pii import build_redactor
    from pipeline.serve.gateway import RequestLog

    log = RequestLog(tmp_path / "req.jsonl", 2**20, 30,
                     build_redactor(SanitizeConfig(custom_pii={"employee": r"\bEMP-\d{5}\b"})))
    log.write({"prompt": "I am EMP-12345, my name is Lena Fischer", "response": "ok Lena"})
    log.flush()
    line = (tmp_path / "req.jsonl").read_text()
    assert "EMP-12345" not in line and "Fischer" not in line and "<EMPLOYEE>" in line and "<NAME>" in line


def test_an_unused_preference_file_is_skipped_not_validated(project, capsys):
    import yaml

    from pipeline import stages
    from pipeline.config import load_params

    bad = project / "data/raw/bad_preference.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "not the task", "rejected": "y"}\n' * 5)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["preference"] = "data/raw/bad_preference.jsonl"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    summary = stages.sanitize(load_params(project / "params.yaml"))
    assert "preference" not in summary and "data.preference (data/raw/bad_preference.jsonl) skipped" in capsys.readouterr().out
    assert Path("data/clean/preference/clean.jsonl").read_text() == ""


def test_a_json_array_input_is_read_with_element_indexes(tmp_path):
    from pipeline.config import SanitizeConfig
    from pipeline.data.sanitize import sanitize_files

    f = tmp_path / "data.json"
    rows = [{"instruction": "Classify: parcel late", "input": "", "output": "shipping"},
            {"instruction": "Classify: charged twice", "output": 5},
            {"instruction": "Classify: refund", "input": "order 7", "output": "billing"}]
    f.write_text(json.dumps(rows, indent=2))
    report = sanitize_files([f], tmp_path / "out", SanitizeConfig())
    assert report["read"] == 3 and report["kept"] == 2
    q = [json.loads(x) for x in (tmp_path / "out/quarantine.jsonl").read_text().splitlines()]
    assert [(e["line"], e["reason"]) for e in q] == [(1, "wrong_type")]
    lines = [json.loads(x)["source"]["line"] for x in (tmp_path / "out/clean.jsonl").read_text().splitlines()]
    assert lines == [0, 2]


def test_evaluate_stops_on_digests_written_under_another_key(tmp_path, monkeypatch, tiny_base):
    from pipeline.config import EvaluateConfig, TaskConfig
    from pipeline.evaluate.scoring import evaluate_stage

    digests = tmp_path / "pii_digests.txt"
    write_digests(digests, {"cd" * 16}, b"the key sanitize used")
    monkeypatch.setenv("LORAFLOW_PII_KEY", "another key")
    with pytest.raises(DigestKeyMismatch, match=str(digests)):
        evaluate_stage(tiny_base, tmp_path / "adapter", tmp_path / "eval.jsonl", EvaluateConfig(out_dir=str(tmp_path)),
                       TaskConfig(), pii_digest_files=[digests])


def _tiny_ner_model(path: Path) -> Path:
    """A two-layer BERT token classifier with a word-level tokenizer, trained for a few seconds on
    sentences with invented names the gazetteer does not know: the recogniser's real loading path."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForTokenClassification, PreTrainedTokenizerFast

    names = ["Zorblax", "Quenby", "Ashdown", "Velmira", "Tharn", "Oskio"]
    words = "the ticket was closed by yesterday asked about a refund for order and called support team we met my name is".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words, *names])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    labels = {0: "O", 1: "B-PER", 2: "I-PER"}
    torch.manual_seed(0)  # before the weights are initialised: the same model every run
    model = BertForTokenClassification(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=64, num_labels=3,
                                                  id2label=labels, label2id={v: k for k, v in labels.items()}))
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        batch_ids, batch_labels = [], []
        for _ in range(16):
            sent = [rng.choice(words) for _ in range(rng.randint(3, 8))]
            at = rng.randrange(len(sent) + 1)
            person = rng.sample(names, rng.randint(1, 2))
            sent[at:at] = person
            tags = [0] * len(sent)
            tags[at:at + len(person)] = [1] + [2] * (len(person) - 1)
            ids = [vocab["[CLS]"], *(vocab[w] for w in sent), vocab["[SEP]"]]
            batch_ids.append(ids + [0] * (12 - len(ids)))
            batch_labels.append([-100, *tags, -100] + [-100] * (12 - len(ids)))
        ids = torch.tensor(batch_ids)
        loss = model(input_ids=ids, attention_mask=(ids != 0).long(), labels=torch.tensor(batch_labels)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return path


def test_an_optional_model_recogniser_adds_what_the_rules_miss(tmp_path):
    from pipeline.config import SanitizeConfig
    from pipeline.pii import build_redactor

    text = "the ticket was closed by Quenby Ashdown yesterday"
    assert redact(text) == (text, {})  # no cue, not in the gazetteer: the rules keep it
    model = _tiny_ner_model(tmp_path / "ner")
    assert sorted(p.name for p in model.glob("*.safetensors")) == ["model.safetensors"]
    r = build_redactor(SanitizeConfig(pii={"recogniser": {"model": str(model)}}))
    assert redact(text, r) == ("the ticket was closed by <NAME> yesterday", {"NAME": 1})
    assert redact("we met Velmira about a refund", r)[0] == "we met <NAME> about a refund"
    assert redact("my name is Lena Fischer", r) == ("my name is <NAME>", {"NAME": 1})  # the rules stay on
    with pytest.raises(ValueError, match="recogniser.labels"):
        build_redactor(SanitizeConfig(pii={"recogniser": {"model": str(model), "labels": {"ORG": "NAME"}}}))
    with pytest.raises(ValueError, match="cannot load"):
        build_redactor(SanitizeConfig(pii={"recogniser": {"model": str(tmp_path / "missing")}}))

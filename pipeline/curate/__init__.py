"""The curate stage: served traffic and its feedback become new, versioned training and eval records.

    python -m pipeline curate            (dvc.yaml runs it before sanitize; `loraflow run` does too)

Reads the gateway's request log and feedback log (live and rotated files) since the last cut and appends
to ``curate.out_dir`` (a DVC output kept between runs, so every cut is a new data version):

- ``train.jsonl``: a corrected answer (a demonstration) as the answer to the request's messages; answers
  rated positively too when ``curate.positive_answers``; a teacher's answer to a request nobody labelled,
  when ``curate.teacher`` is set and the task's parser accepts it.
- ``preference.jsonl``: a correction that differs in meaning from the model's answer, as a DPO pair
  (chosen = correction, rejected = the model's answer).
- ``eval.jsonl``: ``curate.eval_share`` of the curated records, chosen by a hash of the request id (so a
  re-run holds out the same ones), never also trained on; the gate scores this slice separately.
- ``cuts.json``: what each cut added (when, how many records of each kind).

How far the logs were consumed is kept next to them (``curate_cursor.json`` beside the request log), so
the data version changes only when records are added.

Each record carries ``provenance``: request id and time, model and served version, feedback kind and time,
the teacher when one labelled it. An answer rated negatively without a correction is reported, never
trained on. The report (``reports/curate.json``) reconciles: requests seen = curated + skipped by reason
(+ left for the next run beyond the teacher's per-run cap). Everything then passes through sanitize like
any input (PII, dedup, contamination against eval, label conflicts).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pipeline.config import CurateConfig, TaskConfig
from pipeline.io import LogError, LogStats, count_lines, write_json
from pipeline.io import read_log as read_logfile
from pipeline.layout import CURATE_STATE, CURATED_FILES, CURSOR_FILE
from pipeline.tasks import Task

# A request is logged when it ends, stamped with when it started: a slow one can appear after a faster,
# later one. Requests this close before the last cut are looked at again (and skipped if already seen).
SETTLE = timedelta(minutes=15)


def _when(ts: object, where: str) -> datetime:
    try:
        t = datetime.fromisoformat(str(ts))
    except ValueError:
        raise LogError(f"{where}: 'ts' is not an ISO time ({ts!r})") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def read_log(path: Path, stats: LogStats | None = None) -> Iterator[tuple[datetime, dict]]:
    """Every record of a rotated JSONL log with its time, streamed, by the one log policy
    (``pipeline.io.read_log``: a torn last line skipped and counted, damage an error naming file and line)."""
    for f, n, rec in read_logfile(path, stats):
        yield _when(rec.get("ts"), f"{f}:{n}"), rec


def request_messages(rec: dict) -> list[dict]:
    """A logged request's messages (a record without them, from before they were logged: its prompt)."""
    return [dict(m) for m in rec.get("messages") or [{"role": "user", "content": rec.get("prompt", "")}]]


def held_out(request_id: str, share: float, seed: int) -> bool:
    """Deterministic by request id: the same request always lands on the same side."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{request_id}".encode()).digest()[:8], "big")
    return h < share * 2**64


def polarity(fb: dict, cfg: CurateConfig) -> str:
    """positive | negative | neutral | none, from a feedback's thumbs and score (thumbs win)."""
    if fb.get("thumbs") in ("up", "down"):
        return "positive" if fb["thumbs"] == "up" else "negative"
    score = fb.get("score")
    if isinstance(score, (int, float)) and not isinstance(score, bool):
        return "positive" if score >= cfg.positive_at else "negative" if score <= cfg.negative_at else "neutral"
    return "none"


def _given(fb: dict, key: str) -> str | None:
    """A text field the client sent: a non-blank string, else None. Logs written before absent fields
    stayed absent hold ``""`` for each of them: that is nothing sent, never an empty answer."""
    value = fb.get(key)
    return value if isinstance(value, str) and value.strip() else None


def merge_feedback(entries: list[dict], cfg: CurateConfig) -> dict:
    """Several feedbacks on one answer: the latest correction, the latest rating, every comment. A rating
    or a comment never replaces a correction: each field keeps the latest feedback that sent it."""
    out: dict = {"correction": None, "polarity": "none", "comments": 0, "ts": None}
    for fb in entries:
        if _given(fb, "correction") is not None:
            out["correction"], out["correction_ts"] = fb["correction"], fb["ts"]
        p = polarity(fb, cfg)
        if p != "none":
            out["polarity"] = p
        out["comments"] += _given(fb, "comment") is not None
        out["ts"] = fb["ts"]
    return out


@dataclass
class CurateReport:
    requests_seen: int = 0
    curated: Counter[str] = field(default_factory=Counter)  # by feedback kind: correction, positive, teacher
    records: Counter[str] = field(default_factory=Counter)  # written: train, eval, preference
    skipped: Counter[str] = field(default_factory=Counter)  # requests not curated, by reason
    deferred: int = 0  # beyond the teacher's per-run cap: seen again next run
    feedback_read: int = 0
    feedback_orphaned: Counter[str] = field(default_factory=Counter)  # feedback whose request is not usable
    torn_lines: list[str] = field(default_factory=list)  # "file:line" of torn last lines skipped (io.read_log)

    def to_dict(self) -> dict:
        curated = sum(self.curated.values())
        skipped = sum(self.skipped.values())
        return {"requests_seen": self.requests_seen,
                "curated": {"total": curated, "by_kind": dict(sorted(self.curated.items()))},
                "records": {k: self.records.get(k, 0) for k in ("train", "eval", "preference")},
                "skipped": {"total": skipped, "by_reason": dict(sorted(self.skipped.items()))},
                "deferred": self.deferred,
                "feedback": {"read": self.feedback_read, "orphaned": dict(sorted(self.feedback_orphaned.items()))},
                "torn_lines": self.torn_lines,
                "reconciles": self.requests_seen == curated + skipped + self.deferred}


def _read_json(path: Path, empty: object, advice: str):
    if not path.is_file():
        return empty
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:  # never "no cut yet": that would curate every logged request again
        raise LogError(f"{path}: unreadable ({e}); {advice}") from None


def _cursor_state(request_log: Path) -> dict:
    """How far this machine's logs were consumed. It lives with the logs, not in the data version: the
    logs are local, and a cursor in the DVC output would change it on every request."""
    return _read_json(request_log.with_name(CURSOR_FILE),
                      {"requests_until": None, "requests_recent": {}, "feedback_until": None,
                       "feedback_recent": {}, "deferred": {}},
                      "fix or restore it rather than deleting it (deleting curates every logged request again)")


def _new(items: list[tuple[datetime, str, dict]], until: str | None,
         recent: dict[str, str]) -> list[tuple[datetime, str, dict]]:
    """Items after the cut, and items of the settle window before it that the last cut had not seen."""
    if until is None:
        return items
    earliest = datetime.fromisoformat(until) - SETTLE
    return [x for x in items if x[0] > earliest and x[1] not in recent]


def _cursor(items: list[tuple[datetime, str, dict]], until: str | None,
            recent: dict[str, str]) -> tuple[str | None, dict[str, str]]:
    """The new cut: the latest time consumed, and the keys consumed within the settle window before it."""
    merged = {**recent, **{k: t.isoformat() for t, k, _ in items}}
    times = [datetime.fromisoformat(v) for v in merged.values()] + ([datetime.fromisoformat(until)] if until else [])
    if not times:
        return until, {}
    end = max(times)
    return end.isoformat(), {k: v for k, v in merged.items() if datetime.fromisoformat(v) > end - SETTLE}


def answer_problem(messages: list[dict], task: Task) -> str | None:
    """The check a curated record gets when the caller gives none: a non-blank answer the task accepts."""
    answer = messages[-1]["content"]
    if not answer.strip():
        return "blank_content"
    return "invalid_answer" if task.check_reference(answer) else None


def curate(cfg: CurateConfig, task_cfg: TaskConfig, task: Task, request_log: Path, feedback_log: Path,
           out_dir: Path, model: str | None = None, teacher=None, say: Callable[[str], None] = print,
           now: datetime | None = None, trainable: Callable[[list[dict]], str | None] | None = None) -> dict:
    """Cut the logs since the last cut into records (appended to ``out_dir``); returns the report.

    ``model``: only this served model's traffic (a project curates its own). ``teacher``: a
    ``pipeline.curate.teacher.Teacher`` for requests nobody labelled (None: they are skipped).
    ``trainable``: why sanitize would quarantine a record's messages, or None (``stages.curated_record_check``:
    its record checks and the task's answer check); a record it refuses is skipped as ``untrainable_<reason>``,
    so what curate writes is what training gets.
    """
    trainable = trainable or (lambda msgs: answer_problem(msgs, task))
    stats = LogStats()
    now = now or datetime.now(timezone.utc)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _cursor_state(request_log)
    cuts: list[dict] = _read_json(out_dir / CURATE_STATE, [],
                                  f"restore it from DVC (`dvc checkout {out_dir}`) rather than deleting it")
    report = CurateReport()

    feedback_items: list[tuple[datetime, str, dict]] = []
    fb_earliest = datetime.fromisoformat(state["feedback_until"]) - SETTLE if state["feedback_until"] else None
    for t, fb in read_log(feedback_log, stats):
        if (model and fb.get("model") != model) or (fb_earliest is not None and t <= fb_earliest):
            continue  # another model's, or consumed by an earlier cut (streamed: only new ones are kept)
        feedback_items.append((t, f"{fb.get('id')}@{fb.get('ts')}", fb))
    new_feedback = _new(feedback_items, state["feedback_until"], state["feedback_recent"])
    report.feedback_read = len(new_feedback)
    # The request log is streamed; kept in memory are only the requests this cut can use: new ones, and
    # older ones that new feedback names or the last run left for the teacher.
    wanted = {str(fb.get("id")) for _, _, fb in new_feedback} | set(state.get("deferred", {}))
    earliest = datetime.fromisoformat(state["requests_until"]) - SETTLE if state["requests_until"] else None
    requests: dict[str, tuple[datetime, dict]] = {}
    timeline: list[tuple[datetime, str, dict]] = []
    for t, rec in read_log(request_log, stats):
        rid = rec.get("id")
        if not isinstance(rid, str) or (model and rec.get("model") != model):
            continue  # refused before routing (no id), or another model's traffic
        if rid in wanted:
            requests[rid] = (t, rec)
        if earliest is None or t > earliest:
            timeline.append((t, rid, rec))
    new_requests = _new(timeline, state["requests_until"], state["requests_recent"])

    by_request: dict[str, list[dict]] = {}
    for _, _, fb in new_feedback:
        by_request.setdefault(str(fb.get("id")), []).append(fb)
    # What this cut looks at: new requests, and older requests that got new feedback.
    considered: dict[str, tuple[datetime, dict]] = {rid: (t, rec) for t, rid, rec in new_requests}
    for rid in state.get("deferred", {}):  # left by the last run beyond the teacher's cap
        if rid in requests:
            considered.setdefault(rid, requests[rid])
    for rid in by_request:
        if rid in requests:
            considered.setdefault(rid, requests[rid])
        else:
            report.feedback_orphaned["request_not_in_log"] += len(by_request[rid])  # expired or another log
    report.torn_lines = stats.torn
    order = sorted(considered, key=lambda r: considered[r][0])
    report.requests_seen = len(order)

    records: dict[str, list[dict]] = {name: [] for name in ("train", "eval", "preference")}
    unlabelled: list[str] = []
    cut_no = len(cuts) + 1

    def provenance(rid: str, kind: str, fb_ts: str | None, teacher_name: dict | None = None) -> dict:
        t, rec = considered[rid]
        return {"request_id": rid, "request_ts": t.isoformat(), "model": rec.get("model"),
                "served_version": rec.get("version"), "feedback": kind, "feedback_ts": fb_ts,
                **({"teacher": teacher_name} if teacher_name else {}), "cut": cut_no}

    def add(rid: str, answer: str, kind: str, fb_ts: str | None, rejected: str | None = None,
            teacher_name: dict | None = None) -> None:
        msgs = request_messages(considered[rid][1])
        why = trainable(msgs + [{"role": "assistant", "content": answer}])
        if why:
            report.skipped[f"untrainable_{why}"] += 1
            return
        prov = provenance(rid, kind, fb_ts, teacher_name)
        report.curated[kind] += 1
        record = {"messages": msgs + [{"role": "assistant", "content": answer}], "provenance": prov}
        if (kind != "teacher" or cfg.teacher_in_eval) and held_out(rid, cfg.eval_share, cfg.seed):
            records["eval"].append(record)  # held out: judged on, never trained on (no preference pair)
            return
        records["train"].append(record)
        if rejected is not None:
            records["preference"].append({"prompt": msgs, "chosen": answer, "rejected": rejected, "provenance": prov})

    for rid in order:
        _, rec = considered[rid]
        if rec.get("status") != 200:
            report.skipped["not_answered"] += 1
            continue
        fb = merge_feedback(by_request.get(rid, []), cfg)
        response = rec.get("response") or ""
        if fb["correction"] is not None:
            differs = bool(response) and task.answer_key(response) != task.answer_key(fb["correction"])
            add(rid, fb["correction"], "correction", fb.get("correction_ts"), rejected=response if differs else None)
        elif fb["polarity"] == "positive":
            if not cfg.positive_answers:
                report.skipped["positive_not_used"] += 1
            elif task.check_reference(response):
                report.skipped["positive_answer_invalid"] += 1
            else:
                add(rid, response, "positive", fb["ts"])
        elif fb["polarity"] == "negative":
            report.skipped["negative_without_correction"] += 1
        elif fb["polarity"] == "neutral":
            report.skipped["neutral_score"] += 1
        elif fb["comments"]:
            report.skipped["comment_only"] += 1
        elif teacher is None:
            report.skipped["no_feedback"] += 1
        else:
            unlabelled.append(rid)

    deferred: set[str] = set()
    if unlabelled:
        convs = [request_messages(considered[r][1]) for r in unlabelled]
        say(f"curate: {len(unlabelled)} unlabelled request(s) go to teacher {teacher.cfg.model}")
        for rid, lab in zip(unlabelled, teacher.label(convs)):
            if lab is None:
                deferred.add(rid)
            elif lab.answer is None:
                report.skipped["teacher_refused"] += 1
            elif task.check_reference(lab.answer):
                report.skipped["teacher_answer_invalid"] += 1
            else:
                add(rid, lab.answer, "teacher", None, teacher_name=teacher.name)
        report.deferred = len(deferred)

    for name in CURATED_FILES:
        kind = name.removesuffix(".jsonl")
        if records[kind]:
            with open(out_dir / name, "a", encoding="utf-8") as fh:
                for r in records[kind]:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            (out_dir / name).touch()
        report.records[kind] = len(records[kind])
    # Requests beyond the teacher's cap are remembered by id and looked at again next run.
    consumed = [x for x in new_requests if x[1] not in deferred]
    state["deferred"] = {r: considered[r][0].isoformat() for r in sorted(deferred)}
    state["requests_until"], state["requests_recent"] = _cursor(consumed, state["requests_until"],
                                                                state["requests_recent"])
    state["feedback_until"], state["feedback_recent"] = _cursor(new_feedback, state["feedback_until"],
                                                                state["feedback_recent"])
    added = {k: len(v) for k, v in records.items()}
    if any(added.values()) or not (out_dir / CURATE_STATE).is_file():
        if any(added.values()):
            cuts.append({"cut": cut_no, "at": now.isoformat(), **added})
        write_json(out_dir / CURATE_STATE, cuts)  # changes only with the records: a new data version
    write_json(request_log.with_name(CURSOR_FILE), state)
    result = report.to_dict()
    result["teacher"] = ({**teacher.name, **teacher.stats.to_dict()} if teacher is not None else None)
    result["totals"] = {k.removesuffix(".jsonl"): count_lines(out_dir / k) for k in CURATED_FILES}
    result["cuts"] = len(cuts)
    say(f"curate: {result['requests_seen']} request(s) seen: {result['curated']['total']} curated "
        f"({', '.join(f'{k} {v}' for k, v in sorted(report.curated.items())) or 'none'}), "
        f"{result['skipped']['total']} skipped ({', '.join(f'{k} {v}' for k, v in sorted(report.skipped.items())) or 'none'})"
        + (f", {report.deferred} left for the next run (teacher cap)" if report.deferred else ""))
    return result

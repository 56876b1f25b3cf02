"""Benchmark the sanitize stage: throughput against a naive baseline, near-dedup rate, PII accuracy.

    .venv/bin/python bench/sanitize_throughput.py --mb 120        # prints markdown rows for docs/benchmarks.md

1. Throughput (PII redaction + exact dedup, near-dedup off) on a generated chat-JSONL corpus of ``--mb``
   megabytes, single process (= one core), in MB/s, next to a naive baseline run on the same file in the
   same invocation: every detector's regex on every text (no pre-scan), NFKC + per-character format
   stripping on every text, SHA-256 exact dedup in a Python set. Peak RSS of each is reported.
2. Near-dedup (MinHash LSH) throughput in documents/s, and its agreement with exact Jaccard on pairs.
3. PII precision and recall on a labelled corpus generated with Faker (4 locales) plus look-alikes that
   must survive (order numbers, versions, dates, amounts, ticket ids, ISBNs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
import unicodedata
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import pii  # noqa: E402
from pipeline.config import SanitizeConfig  # noqa: E402
from pipeline.dedup import Deduplicator, jaccard, shingles  # noqa: E402
from pipeline.data.sanitize import sanitize_files  # noqa: E402

WORDS = ("the order parcel invoice account password login refund delivery tracking app crashes settings "
         "update version error page browser support team customer subscription plan billing payment card "
         "number address email phone please help urgent today tomorrow week month thanks regards issue "
         "problem working broken slow fast again still never always sometimes maybe could would should").split()


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Chat JSONL of about ``megabytes`` MB: 1-2 KB records, ~8% with PII, ~3% exact duplicates."""
    from faker import Faker

    rng = random.Random(seed)
    fake = Faker(["en_US", "en_GB", "de_DE", "fr_FR"])
    fake.seed_instance(seed)
    pool = ([fake.email() for _ in range(300)] + [fake.phone_number() for _ in range(300)] +
            [fake.credit_card_number() for _ in range(100)] + [fake.iban() for _ in range(100)] +
            [fake.ipv4() for _ in range(100)])
    target = int(megabytes * 1e6)
    written, n, recent = 0, 0, []
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            if recent and rng.random() < 0.03:
                line = rng.choice(recent)
            else:
                words = rng.choices(WORDS, k=rng.randint(150, 300))
                for _ in range(3):
                    words.insert(rng.randrange(len(words)), f"ORD-{rng.randint(10000, 99999)}")
                if rng.random() < 0.08:
                    words.insert(rng.randrange(len(words)), rng.choice(pool))
                if rng.random() < 0.02:
                    words.insert(rng.randrange(len(words)), "Grüße, café — naïve")
                line = json.dumps({"messages": [{"role": "user", "content": " ".join(words)},
                                                {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=20))}]},
                                  ensure_ascii=False)
                recent = (recent + [line])[-50:]
            fh.write(line + "\n")
            written += len(line.encode()) + 1
            n += 1
    return n


def naive_sanitize(path: Path) -> dict:
    """The straightforward version: every regex on every text, no fast paths."""
    detectors = pii.build_detectors()
    seen: set[str] = set()
    kept = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            obj = json.loads(line)
            msgs = []
            for m in obj["messages"]:
                text = unicodedata.normalize("NFKC", m["content"])
                text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
                for det in detectors:
                    text = det.pattern.sub(lambda mm, d=det: d.replacement(mm) if d.verify is None or d.verify(mm)
                                           else mm.group(), text)
                msgs.append({"role": m["role"], "content": text})
            key = hashlib.sha256(json.dumps(msgs).encode()).hexdigest()
            if key not in seen:
                seen.add(key)
                kept += 1
    return {"kept": kept}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_in_child(fn, *args) -> tuple[float, float, dict]:
    """Run ``fn`` in a forked child so each gets its own peak-RSS figure."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        t = time.perf_counter()
        out = fn(*args)
        payload = json.dumps({"s": time.perf_counter() - t, "rss": _peak_rss_mb(), "out": out}).encode()
        os.write(w, payload)
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.waitpid(pid, 0)
    res = json.loads(data)
    return res["s"], res["rss"], res["out"]


def _ours(path: Path, out: Path, near: bool) -> dict:
    cfg = SanitizeConfig(near_duplicates=near, max_chars=100_000)
    r = sanitize_files([path], out, cfg)
    return {"kept": r["kept"], "read": r["read"], "dups": r["duplicates"]}


def bench_throughput(mb: float, repeats: int = 3) -> list[str]:
    """``repeats`` paired runs (ours, naive baseline, ours with near-dedup) on one corpus; medians and spread."""
    import statistics

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        n = make_corpus(corpus, mb)
        size = corpus.stat().st_size / 1e6
        runs = []
        for i in range(repeats):
            t_ours, rss_ours, ours = _run_in_child(_ours, corpus, Path(tmp) / f"o1-{i}", False)
            t_naive, rss_naive, naive = _run_in_child(naive_sanitize, corpus)
            t_near, rss_near, near = _run_in_child(_ours, corpus, Path(tmp) / f"o2-{i}", True)
            assert ours["kept"] == naive["kept"], (ours, naive)
            runs.append((t_ours, t_naive, t_near, rss_ours, rss_naive, rss_near, near))
    med = statistics.median
    ours_mbs = [size / r[0] for r in runs]
    ratio = [r[1] / r[0] for r in runs]
    near_mbs = [size / r[2] for r in runs]
    spread = lambda xs: f"{min(xs):.1f}-{max(xs):.1f}"  # noqa: E731
    near = runs[0][6]
    return [
        f"| {date.today()} | {_machine()} | `python bench/sanitize_throughput.py --mb {mb:g}` | {size:.0f} MB, {n:,} "
        f"records, {repeats} paired runs | PII + exact dedup: **{med(ours_mbs):.1f} MB/s** median ({spread(ours_mbs)}; "
        f"peak RSS {max(r[3] for r in runs):.0f} MB) | naive baseline: {med([size / r[1] for r in runs]):.1f} MB/s "
        f"(peak RSS {max(r[4] for r in runs):.0f} MB) | **{med(ratio):.1f}x** median ({spread(ratio)}) |",
        f"| {date.today()} | {_machine()} | same runs, near-dedup on | {size:.0f} MB, {n:,} records | "
        f"PII + exact + verified MinHash LSH: {med(near_mbs):.1f} MB/s median ({spread(near_mbs)}; peak RSS "
        f"{max(r[5] for r in runs):.0f} MB) | exact dups {near['dups']['exact']:,}, near {near['dups']['near']:,} | - |",
    ]


def bench_memory(mb: float) -> str:
    """Peak RSS of the full stage (exact + near dedup) on a large file: memory must not follow file size."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        n = make_corpus(corpus, mb, seed=1)
        size = corpus.stat().st_size / 1e6
        secs, rss, out = _run_in_child(_ours, corpus, Path(tmp) / "o", True)
    return (f"| {date.today()} | {_machine()} | `python bench/sanitize_throughput.py --memory-mb {mb:g}` | "
            f"{size:,.0f} MB, {n:,} records | exact + near dedup, PII: {size / secs:.1f} MB/s | "
            f"**peak RSS {rss:.0f} MB** ({rss / size * 100:.1f}% of the input size) | - |")


def bench_near_dedup(n: int = 20_000, seed: int = 0) -> list[str]:
    """docs/s of Deduplicator.check+add alone, and agreement with exact word-trigram Jaccard.

    Half the documents are originals; each has one variant: a few word edits (0, 1, 2, 6 or 12), or the
    same text with one number changed (a templated record: distinct by design, must be kept).
    """
    rng = random.Random(seed)
    docs, kinds = [], []
    for _ in range(n // 2):
        words = rng.choices(WORDS, k=40)
        words[rng.randrange(40)] = str(rng.randint(1000, 9999))  # every record carries a value
        docs.append(" ".join(words))
        kinds.append("original")
        if rng.random() < 0.2:
            i = next(j for j, w in enumerate(words) if w.isdigit())
            variant = words[:i] + [str(int(words[i]) + rng.randint(1, 50))] + words[i + 1:]
            kinds.append("value")
        else:
            variant = list(words)
            for _ in range(rng.choice([0, 1, 2, 6, 12])):
                j = rng.randrange(len(variant))
                if not variant[j].isdigit():
                    variant[j] = rng.choice(WORDS)
            kinds.append("edit")
        docs.append(" ".join(variant))
    dd = Deduplicator(threshold=0.85)
    t = time.perf_counter()
    flags = []
    for i, d in enumerate(docs):
        v = dd.check(f"{d}\nA", d, "A")  # one answer for all: only the prompts tell records apart
        flags.append(v.kind in ("near", "exact"))
        if v.token is not None:
            dd.add(v.token)
    secs = time.perf_counter() - t
    tp = fp = fn = negatives = 0
    values_kept = values = 0
    for i in range(1, len(docs), 2):  # each variant against its own original
        if kinds[i] == "value":
            values += 1
            values_kept += not flags[i]
            continue
        truth = jaccard(shingles(docs[i - 1], 3), shingles(docs[i], 3)) >= 0.85
        negatives += not truth
        tp += truth and flags[i]
        fp += (not truth) and flags[i]
        fn += truth and not flags[i]
    return [f"| {date.today()} | {_machine()} | `python bench/sanitize_throughput.py` (near-dedup) | {len(docs):,} docs "
            f"of 40 words | {len(docs) / secs:,.0f} docs/s, {dd.verified_pairs:,} candidates verified | vs exact "
            f"Jaccard >= 0.85 on edited pairs: precision {tp / max(tp + fp, 1):.3f}, recall {tp / max(tp + fn, 1):.3f}, "
            f"false positives {fp}/{negatives} ({fp / max(negatives, 1):.2%}); templated pairs differing in one value "
            f"kept: {values_kept}/{values} | index {dd.nbytes / 1e6:.1f} MB in RAM |"]


NEGATIVES = ["Order ORD-{n5} is late", "Version {v} broke sync", "Invoice {y}-{m:02d}-{d:02d}",
             "Paid ${n4},{n3}.00 on {m:02d}/{d:02d}/{y}", "Ticket #{n6} reopened", "case INC-{n7}",
             "ISBN 978-3-16-148410-0", "at {m:02d}:{d:02d}:00 UTC", "build {y}.{m}.{d}", "port {n4}, pid {n5}",
             "room {m}.{n3}", "sha {hex}", "deployed at {y}-{m:02d}-{d:02d} {m:02d}:{d:02d} UTC",
             "build {y}{m:02d}{d:02d}.{m:02d}{d:02d}", "run {y}{m:02d}{d:02d}-1{n5}", "timestamp 17{n4}{n4}",
             "version 10.0.{n5}.{n4}", "ISBN 0-306-40615-2", "FedEx {n4} {n4} {n4}", "ref 48{n4}{n4}",
             "tracking 1Z999AA1{n4}{n4}{n3}", "order #{n3}-{n7}-{n7}"]


def bench_pii(n_per_type: int = 400, seed: int = 0) -> list[str]:
    from faker import Faker

    rng = random.Random(seed)
    fake = Faker(["en_US", "en_GB", "de_DE", "fr_FR"])
    fake.seed_instance(seed)
    gens = {
        "EMAIL": fake.email, "PHONE": fake.phone_number, "CARD": fake.credit_card_number, "IBAN": fake.iban,
        "SSN": lambda: Faker("en_US").ssn(), "IP_ADDRESS": lambda: rng.choice([fake.ipv4, fake.ipv6])(),
        "AWS_ACCESS_KEY": lambda: "AKIA" + "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", k=16)),
        "JWT": lambda: "eyJhbGciOiJIUzI1NiJ9.eyJ" + "".join(rng.choices("abcdefghijkXYZ0123456789_-", k=30))
                       + "." + "".join(rng.choices("abcdefghijkXYZ0123456789_-", k=43)),
        "URL_CREDENTIALS": lambda: f"https://{fake.user_name()}:{fake.password(special_chars=False)}@{fake.domain_name()}/x",
    }
    templates = ["Please contact me at {v} as soon as possible.", "{v}", "My details: {v}, thanks!",
                 "Hi, see ({v}) for reference.", "Update: {v} - sent from my phone"]
    per_type = {}
    tp_total = fn_total = fp = 0
    for kind, gen in gens.items():
        tp = fn = 0
        for _ in range(n_per_type):
            value = gen()
            out, counts = pii.redact(rng.choice(templates).format(v=value))
            core = value.split("@")[0].split(":")[-1] if kind == "URL_CREDENTIALS" else value
            if core not in out and counts.get(kind, 0) >= 1:
                tp += 1
            else:
                fn += 1
            fp += sum(v for k, v in counts.items() if k != kind)  # right text, wrong type
        per_type[kind] = tp / (tp + fn)
        tp_total += tp
        fn_total += fn
    negatives = 0
    for _ in range(n_per_type * 3):
        text = rng.choice(NEGATIVES).format(
            n3=rng.randint(100, 999), n4=rng.randint(1000, 9999), n5=rng.randint(10000, 99999),
            n6=rng.randint(100000, 999999), n7=rng.randint(1000000, 9999999), v=f"{rng.randint(0, 20)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}",
            y=rng.randint(1990, 2030), m=rng.randint(1, 12), d=rng.randint(1, 28), hex=f"{rng.getrandbits(64):016x}")
        _, counts = pii.redact(text)
        negatives += 1
        fp += sum(counts.values())
    recall = tp_total / (tp_total + fn_total)
    precision = tp_total / (tp_total + fp)
    detail = ", ".join(f"{k} {v:.3f}" for k, v in per_type.items())
    return [f"| {date.today()} | {_machine()} | `python bench/sanitize_throughput.py` (PII accuracy) | "
            f"{tp_total + fn_total:,} labelled values (Faker en_US/en_GB/de_DE/fr_FR) + {negatives:,} look-alikes | "
            f"**recall {recall:.4f}**, **precision {precision:.4f}** ({fp} false positives) | recall by type: {detail} |"]


def _machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=120)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--memory-mb", type=float, default=0, help="only the peak-RSS run on a corpus this large")
    args = ap.parse_args()
    if args.memory_mb:
        print(bench_memory(args.memory_mb))
        return
    rows = bench_pii() + bench_near_dedup()
    if not args.skip_throughput:
        rows += bench_throughput(args.mb)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

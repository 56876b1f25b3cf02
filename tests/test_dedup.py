import random

from datasketch import MinHash
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.dedup import Deduplicator, IntMap, IntSet, MinHasher, choose_bands


@settings(max_examples=50, deadline=None)
@given(keys=st.lists(st.integers(-(2**63), 2**63 - 1).filter(lambda k: k != 0), max_size=300))
def test_intset_behaves_like_a_set(keys):
    s, ref = IntSet(capacity=4), set()
    for k in keys:
        assert s.add(k) == (k not in ref)
        ref.add(k)
    assert len(s) == len(ref) and all(k in s for k in ref)
    assert not any(k + 1 in s for k in ref if k + 1 not in ref and k + 1 != 0)


def test_minhash_estimates_jaccard_like_datasketch():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(400)]
    hasher = MinHasher(num_perm=256, shingle=1)
    for _ in range(20):
        a = set(rng.sample(vocab, 60))
        b = set(rng.sample(sorted(a), rng.randint(10, 60))) | set(rng.sample(vocab, rng.randint(0, 40)))
        true = len(a & b) / len(a | b)
        ours = float((hasher.signature(" ".join(sorted(a))) == hasher.signature(" ".join(sorted(b)))).mean())
        ma, mb = MinHash(num_perm=256), MinHash(num_perm=256)
        ma.update_batch([w.encode() for w in a])
        mb.update_batch([w.encode() for w in b])
        assert abs(ours - true) < 0.12 and abs(ma.jaccard(mb) - true) < 0.12


def test_intmap_keeps_first_value_and_capped_multivalues():
    m = IntMap(capacity=4)
    for k in range(1, 200):
        assert m.setdefault(k, k * 2) == k * 2
        assert m.setdefault(k, 7) == k * 2
    assert m.get(50) == 100 and m.get(10_000) is None
    multi = IntMap(capacity=4)
    for v in range(10):
        multi.add(42, v, cap=3)
        multi.add(43 + v, v, cap=3)
    assert sorted(multi.get_all(42)) == [0, 1, 2] and multi.get_all(45) == [2]
    folded = IntMap(capacity=4, key_bits=32, max_load=0.75)
    for k in range(1, 300):
        folded.add(k << 40, k, cap=4)
    assert all(folded.get_all(k << 40) == [k] for k in range(1, 300))


def test_band_choice_tracks_threshold():
    for threshold in (0.5, 0.7, 0.85, 0.95):
        b, r = choose_bands(128, threshold)
        assert b * r <= 128 and abs((1 / b) ** (1 / r) - threshold) < 0.06


def _keep(d, prompt, answer="A", record=None):
    v = d.check(record or f"{prompt}\n{answer}", prompt, answer)
    assert v.kind is None, (prompt, v)
    return d.add(v.token)


def test_near_duplicates_are_found_and_distinct_texts_are_not():
    d = Deduplicator(threshold=0.8)
    base = "the parcel for order ORD-1 never arrived and tracking has shown nothing since monday morning"
    _keep(d, base)
    assert d.check("r2", base.upper() + "!!", "A").kind == "near"
    assert d.check(f"{base}\nA", base, "A").kind == "exact"
    assert d.check("r3", "my invoice shows the wrong amount for the business plan this month", "A").kind is None
    assert d.contains(base.replace("monday", "Monday"), "A") and not d.contains("a completely different ticket", "A")


def test_templated_records_that_differ_in_a_value_are_distinct():
    d = Deduplicator(threshold=0.85)
    schema = ("Schema: CREATE TABLE employees (id INTEGER, name TEXT, dept TEXT, salary REAL, hired INTEGER); "
              "CREATE TABLE depts (name TEXT, floor INTEGER). Write one SQLite query. Question: ")
    for year in range(1990, 2030):
        q = f"{schema}how many employees were hired in {year}?"
        _keep(d, q, f"SELECT count(*) FROM employees WHERE hired = {year}")
    for name in ("Alice Smith", "Bob Jones", "Chen Wei"):
        _keep(d, f"{schema}what is the salary of {name}?", "SELECT salary FROM employees WHERE name = ?")
    # The same template and value re-sent with other spacing and case is a near-duplicate.
    again = f"{schema}How many employees were hired in 2001 ?"
    assert d.check("x", again, "SELECT count(*) FROM employees WHERE hired = 2001").kind == "near"
    assert d.check("y", f"{schema}what is the salary of ALICE SMITH?",
                   "SELECT salary FROM employees WHERE name = ?").kind == "near"


def test_any_script_is_deduplicated_and_distinct_prompts_are_kept():
    prompts = {
        "ru": ["Сколько сотрудников работает в отделе продаж в этом году?", "Какая столица Франции и сколько там жителей?",
               "Почему заказ не доставлен вовремя, хотя оплата прошла?"],
        "el": ["Ποια είναι η πρωτεύουσα της Ελλάδας σήμερα;", "Πόσοι υπάλληλοι εργάζονται στο τμήμα πωλήσεων;"],
        "ar": ["ما هي عاصمة مصر وكم عدد سكانها؟", "لماذا لم يصل الطلب في الوقت المحدد؟"],
        "zh": ["东京都的人口是多少？", "北京的天气怎么样？", "这个订单为什么还没有发货？"],
        "ja": ["東京の人口は何人ですか？", "京都のおすすめの観光地を教えてください。"],
    }
    d = Deduplicator(threshold=0.85)
    for lang, items in prompts.items():
        for p in items:
            _keep(d, p)
    for lang, items in prompts.items():
        p = items[0]
        assert d.check("r", f"  {p}  ", "A").kind == "near", lang
        if p.upper() != p:  # Arabic, Chinese and Japanese have no case
            assert d.check("r", p.upper(), "A").kind == "near", lang


def test_same_prompt_with_another_answer_is_a_label_conflict():
    d = Deduplicator()
    first = _keep(d, "is this spam?", "yes")
    v = d.check("is this spam?\nno", "is this spam?", "no")
    assert v.kind == "label_conflict" and v.other == first
    # Every later record of a contested prompt joins the conflict, even one repeating the first answer.
    assert d.check("is this spam?\nyes", "is this spam?", "yes").kind == "label_conflict"


def test_index_memory_is_bounded_per_record():
    d = Deduplicator()
    rng = random.Random(1)
    words = [f"w{i}" for i in range(5000)]
    for i in range(20_000):
        _keep(d, " ".join(rng.choices(words, k=30)) + f" {i}")
    assert d.nbytes / 20_000 < 400  # bytes a record, prompts on disk

import random

from datasketch import MinHash
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.dedup import Deduplicator, IntSet, MinHasher, choose_bands


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


def test_band_choice_tracks_threshold():
    for threshold in (0.5, 0.7, 0.85, 0.95):
        b, r = choose_bands(128, threshold)
        assert b * r <= 128 and abs((1 / b) ** (1 / r) - threshold) < 0.06


def test_near_duplicates_are_found_and_distinct_texts_are_not():
    d = Deduplicator(threshold=0.8)
    base = "the parcel for order ORD-1 never arrived and tracking has shown nothing since monday morning"
    _, tok = d.check("r1", base)
    d.add(tok)
    assert d.check("r2", base.upper() + "!!")[0] == "near"
    assert d.check("r1", "anything")[0] == "exact"
    assert d.check("r3", "my invoice shows the wrong amount for the business plan this month")[0] is None
    assert d.knows_prompt(base.replace("monday", "Monday")) and not d.knows_prompt("a completely different ticket")

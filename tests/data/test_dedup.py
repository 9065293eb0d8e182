"""Deduplication: shingles, fingerprints, LSH banding and near-duplicate clusters against exact Jaccard."""
from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from medtune.data.dedup import (
    Sketcher, codepoints, exact_duplicate_of, fingerprints, lsh_bands, near_duplicate_groups, shingle_hashes,
    sketch_rows,
)


def jaccard(a: str, b: str, n: int = 3) -> float:
    sa, sb = ({s[i:i + n] for i in range(len(s) - n + 1)} for s in (a, b))
    return len(sa & sb) / len(sa | sb)


def test_shingles_are_the_texts_character_trigrams():
    texts = ["高血压能吃党参吗", "高血压能吃党参吗？", "ab", "", "abcabc", "x"]
    tokens, offsets = shingle_hashes(*codepoints(pa.array(texts)))
    rows = [tokens[offsets[i]:offsets[i + 1]] for i in range(len(texts))]
    assert [len(r) for r in rows] == [6, 7, 1, 0, 4, 1]
    assert set(rows[0]) < set(rows[1])                       # the same trigrams hash the same
    assert len(set(rows[4])) == 3                            # abc, bca, cab (abc twice)
    assert rows[2][0] != rows[5][0] and rows[2][0] not in set(rows[4])  # short texts are themselves


def test_fingerprints_equal_exactly_for_equal_texts():
    fp = fingerprints(pa.array(["高血压", "高血压", "高血压。", ""]))
    assert fp.shape == (4, 16)
    assert (fp[0] == fp[1]).all() and not (fp[0] == fp[2]).all()
    assert exact_duplicate_of(pa.array(["a", "b", "a", "c", "b"])).tolist() == [0, 1, 0, 3, 1]


@pytest.mark.parametrize("threshold, perm", [(0.8, 64), (0.6, 64), (0.5, 128)])
def test_lsh_bands_reach_the_recall(threshold, perm):
    b, r = lsh_bands(threshold, perm, recall=0.98)
    assert b * r <= perm and 1 - (1 - threshold ** r) ** b >= 0.98
    # and it is the most selective such banding
    assert 1 - (1 - threshold ** (r + 1)) ** (perm // (r + 1)) < 0.98


def _edit(text: str, rng: random.Random, changes: int) -> str:
    chars = list(text)
    for _ in range(changes):
        chars[rng.randrange(len(chars))] = rng.choice("的了是在有和")
    return "".join(chars)


def test_near_duplicates_cluster_and_others_do_not(sample_rows):
    rng = random.Random(0)
    base = [r[1] + r[2] + r[3] for r in sample_rows[:400]]
    copies = [_edit(t, rng, 2) for t in base[:100]]               # a couple of characters changed
    texts = base + copies
    cols = sketch_rows(pa.array(texts), pa.array([""] * len(texts)), Sketcher(0.8, 64, seed=1), Sketcher(0.6, 64, seed=2))
    g = near_duplicate_groups(cols["qa_bands"], cols["qa_sketch"], 0.8)
    exact = np.array([jaccard(texts[i], texts[g.label[i]]) for i in range(len(texts))])
    true_pairs = [(i, 400 + i) for i in range(100) if jaccard(base[i], copies[i]) >= 0.85]
    assert len(true_pairs) > 90
    assert all(g.label[j] == g.label[i] for i, j in true_pairs)   # clear near copies are found
    moved = g.label != np.arange(len(texts))
    assert (exact[moved] >= 0.65).all()                            # nothing unrelated is merged
    assert np.abs(g.similarity[moved] - exact[moved]).max() < 0.2  # the estimate tracks the exact value
    assert (g.label <= np.arange(len(texts))).all()                # the first row of a cluster represents it


def test_margin_links_more_pairs_never_fewer(sample_rows):
    qs = pa.array([r[1] + r[2] for r in sample_rows[:1500]])
    cols = sketch_rows(qs, pa.array([""] * len(qs)), Sketcher(0.8, 64), Sketcher(0.6, 64, recall=0.98))
    strict = near_duplicate_groups(cols["q_bands"], cols["q_sketch"], 0.6)
    loose = near_duplicate_groups(cols["q_bands"], cols["q_sketch"], 0.6, margin=0.15)
    assert loose.confirmed >= strict.confirmed
    for i in np.flatnonzero(strict.label != np.arange(len(qs))):   # strict clusters stay together
        assert loose.label[i] == loose.label[strict.label[i]]


def test_band_pairs_compare_twins_behind_an_unrelated_bucket_head():
    import numpy as np

    from medtune.data.dedup import _band_pairs

    key = np.array([7, 5, 5, 5, 9, 5], dtype=np.uint32)  # bucket 5: rows 1, 2, 3, 5
    n = len(key)
    pairs = {(int(p // n), int(p % n)) for p in _band_pairs(key)}
    assert pairs == {(1, 2), (1, 3), (1, 5), (2, 3), (2, 5), (3, 5)}
    big = np.zeros(40, dtype=np.uint32)  # a bucket over the cap: head and neighbour pairs only
    pairs = {(int(p // 40), int(p % 40)) for p in _band_pairs(big, cap=16)}
    assert pairs == {(0, i) for i in range(1, 40)} | {(i - 1, i) for i in range(1, 40)}

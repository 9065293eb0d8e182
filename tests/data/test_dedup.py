"""Deduplication: shingles, fingerprints, LSH banding and near-duplicate clusters against exact Jaccard."""
from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from medtune.data.dedup import (
    Sketcher, _matrix, exact_duplicate_of, lsh_bands, near_duplicate_groups, sketch_rows, utf8_buffers,
)


def jaccard(a: str, b: str, n: int = 3) -> float:
    sa, sb = ({s[i:i + n] for i in range(len(s) - n + 1)} for s in (a, b))
    return len(sa & sb) / len(sa | sb)


def _sketches(questions, answers=None, perm=64):
    answers = [""] * len(questions) if answers is None else answers
    cols = sketch_rows(pa.array(questions), pa.array(answers), Sketcher(0.8, perm, seed=1), Sketcher(0.6, perm, seed=2))
    return {k: _matrix(v, np.uint8 if k != "qa_bands" and k != "q_bands" else np.uint32) for k, v in cols.items()}


def test_sketches_are_minhash_of_the_character_trigrams():
    # "abcabc" and "abcabca" have the same trigrams (abc, bca, cab): the same signature (the questions'
    # sketch: joined with the answer, "c\n" and "a\n" would differ); "abcabd" has one more (abd)
    s = _sketches(["abcabc", "abcabca", "abcabd", "ab", "x", "高血压能吃党参吗", "高血压能吃党参吗？"])
    assert (s["q_sketch"][0] == s["q_sketch"][1]).all() and (s["q_bands"][0] == s["q_bands"][1]).all()
    assert not (s["q_sketch"][0] == s["q_sketch"][2]).all()
    assert (s["q_sketch"][3] != s["q_sketch"][4]).any()              # short texts are themselves
    # 6 of the 7 trigrams shared: the estimate is near 6/7
    agree = (s["q_sketch"][5] == s["q_sketch"][6]).mean()
    assert 0.6 < agree < 1.0
    # question + answer: "ab" + "\n" + "c" is one text of 4 characters, not the question's sketch
    qa = _sketches(["ab"], ["c"])
    assert (qa["qa_sketch"][0] != qa["q_sketch"][0]).any()


def test_the_question_sketch_ignores_the_answer():
    s = _sketches(["胸口疼怎么办", "胸口疼怎么办"], ["多休息。", "去医院做心电图检查。"])
    assert (s["q_sketch"][0] == s["q_sketch"][1]).all()
    assert (s["qa_sketch"][0] != s["qa_sketch"][1]).any()


def test_fingerprints_equal_exactly_for_equal_texts():
    s = _sketches(["高血压", "高血压", "高血压。", "", "高血", "高"], ["", "", "", "", "压", "血压"])
    fp = s["qa_print"]
    assert fp.shape == (6, 16)
    assert (fp[0] == fp[1]).all() and not (fp[0] == fp[2]).all()
    # the boundary between question and answer counts: 高血|压 and 高|血压 are different rows
    assert len({bytes(r) for r in fp[[0, 2, 3, 4, 5]]}) == 5
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


def _link(key: np.ndarray, low: np.ndarray, cap: int = 16) -> tuple[np.ndarray, np.ndarray]:
    from medtune.data.kernels import link_band, roots

    n = len(key)
    keyed = (key.astype(np.uint64) << np.uint64(32)) | np.arange(n, dtype=np.uint64)
    keyed.sort()
    parent, counts = np.arange(n, dtype=np.int64), np.zeros(2, np.int64)
    link_band(keyed, parent, low, np.arange(n), low.shape[1], cap, counts)  # linked only when every slot agrees
    return roots(parent), counts


def test_band_buckets_compare_twins_behind_an_unrelated_bucket_head():
    rng = np.random.default_rng(0)
    key = np.array([7, 5, 5, 5, 9, 5], dtype=np.uint32)  # bucket 5: rows 1, 2, 3, 5
    low = rng.integers(0, 256, (6, 32), dtype=np.uint8)
    low[5] = low[2]                                     # twins, neither the bucket's first row
    label, counts = _link(key, low)
    assert label.tolist() == [0, 1, 2, 3, 4, 2]
    assert counts.tolist() == [6, 1]                    # all 6 pairs of the bucket compared
    # a bucket over the cap: each row against the bucket's first row and the row before it only
    low = rng.integers(0, 256, (40, 32), dtype=np.uint8)
    low[30], low[21], low[35] = low[10], low[20], low[0]
    label, counts = _link(np.zeros(40, np.uint32), low)
    assert label[21] == 20 and label[35] == 0           # neighbours, and the first row
    assert label[30] == 30                              # rows 10 and 30 are never compared
    assert counts[0] == 39 + 38 and counts[1] == 2


def test_utf8_buffers_of_a_single_chunk_share_its_memory():
    arr = pa.array(["高血压", "胃痛", "头痛"]).slice(1)
    data, offsets = utf8_buffers(pa.chunked_array([arr]))
    assert data.ctypes.data == arr.buffers()[2].address  # not copied
    assert bytes(data[offsets[0]:offsets[-1]]).decode() == "胃痛头痛"
    data, offsets = utf8_buffers(pa.chunked_array([arr, arr]))  # several chunks are joined
    assert bytes(data[offsets[0]:offsets[-1]]).decode() == "胃痛头痛胃痛头痛"

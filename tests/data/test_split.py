"""The split: seeded, stratified, fractions honoured, clusters whole, no near twin across test and train."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medtune.data import SPLITS
from medtune.data.split import assign_splits


def test_fractions_seed_and_strata():
    strata = pa.array(["内科/心血管科"] * 2000 + ["内科/消化科"] * 1000 + ["外科/骨科"] * 40 + ["儿科/"] * 3)
    n = len(strata)
    split = assign_splits(strata, np.arange(n), (0.8, 0.1, 0.1), seed=7)
    s = np.array(strata.to_pylist())
    for name, size in (("内科/心血管科", 2000), ("内科/消化科", 1000), ("外科/骨科", 40)):
        counts = np.bincount(split[s == name], minlength=3) / size
        assert np.allclose(counts, [0.8, 0.1, 0.1], atol=0.03), (name, counts)
    assert (split[s == "儿科/"] == 0).sum() >= 2  # a tiny stratum: mostly train (each row goes where its middle falls)
    assert (assign_splits(strata, np.arange(n), (0.8, 0.1, 0.1), seed=7) == split).all()
    assert (assign_splits(strata, np.arange(n), (0.8, 0.1, 0.1), seed=8) != split).any()


def test_clusters_go_whole():
    n = 3000
    rng = np.random.default_rng(0)
    label = np.arange(n)
    for head in rng.choice(n // 2, 200, replace=False):  # 200 clusters of 2-6 rows
        members = rng.choice(np.arange(n // 2, n), rng.integers(1, 6), replace=False)
        label[members] = np.minimum(label[members], head)
    split = assign_splits(pa.array(["a"] * n), label, (0.9, 0.05, 0.05), seed=0)
    for head in np.unique(label):
        assert len(set(split[label == head])) == 1


def test_bad_fractions():
    with pytest.raises(ValueError):
        assign_splits(pa.array(["a"]), np.arange(1), (0.5, 0.3, 0.3), seed=0)


def _exact_cross_jaccard(a: list[str], b: list[str]) -> np.ndarray:
    """Character-trigram Jaccard of every (a, b) pair with any overlap."""
    from sklearn.feature_extraction.text import CountVectorizer

    cv = CountVectorizer(analyzer="char", ngram_range=(3, 3), binary=True, lowercase=False).fit(a + b)
    A, B = cv.transform(a).astype(np.float32), cv.transform(b).astype(np.float32)
    sa, sb = np.asarray(A.sum(1)).ravel(), np.asarray(B.sum(1)).ravel()
    inter = (A @ B.T).tocoo()
    return inter.data / (sa[inter.row] + sb[inter.col] - inter.data)


def test_no_test_question_has_a_near_twin_in_train(prepared_sample_dir: Path):
    manifest = json.loads((prepared_sample_dir / "manifest.json").read_text(encoding="utf-8"))
    threshold = manifest["settings"]["split_threshold"]
    q = {s: pq.read_table(prepared_sample_dir / f"{s}.parquet")["question"].to_pylist() for s in SPLITS}
    # The sample does hold near-twin questions (within train, where the split put them together) ...
    within = _exact_cross_jaccard(q["train"][:3000], q["train"][:3000])
    assert ((within >= threshold) & (within < 1)).sum() > 20
    # ... but none across the boundary.
    for other in ("test", "validation"):
        cross = _exact_cross_jaccard(q[other], q["train"])
        assert cross.max() < threshold, (other, cross.max())

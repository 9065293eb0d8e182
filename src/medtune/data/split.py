"""Seeded, stratified train/validation/test split that keeps near-twin questions on one side.

Rows are first grouped into clusters of near-duplicate QUESTIONS (MinHash on the question alone, at a
lower Jaccard threshold than deduplication — 0.6 by default, where the sample's pairs are paraphrases
of one question — linked down to 0.15 below it so that the estimate's noise does not split a pair; see
`medtune.data.dedup.near_duplicate_groups`); a cluster is assigned as a whole, so no test question has
a near twin in train. Clusters are then assigned per
stratum (department + sub-department, taken from the cluster's first row): in a seeded random order,
each cluster goes to the split whose share of the stratum its middle falls into. The same input, seed
and settings give the same split.

    >>> assign_splits(pa.array(["内科/心血管科"] * 20), np.arange(20), (0.8, 0.1, 0.1), seed=0)  # doctest: +SKIP
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc



def check_fractions(fractions: tuple[float, float, float]) -> None:
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
        raise ValueError(f"split fractions {fractions} must be non-negative, sum to 1, and leave rows for train")


def assign_splits(strata: pa.Array | pa.ChunkedArray, cluster: np.ndarray, fractions: tuple[float, float, float],
                  seed: int) -> np.ndarray:
    """Per row, its split (0 train, 1 validation, 2 test); rows of one ``cluster`` label share a split.

    ``cluster[i]`` is the index of row i's cluster's first row (`Groups.label`).
    """
    check_fractions(fractions)
    n = len(cluster)
    if n == 0:
        return np.zeros(0, dtype=np.int8)
    heads = np.flatnonzero(cluster == np.arange(n))               # one per cluster, in input order
    size = np.bincount(cluster, minlength=n)[heads]
    codes = pc.dictionary_encode(strata.combine_chunks() if isinstance(strata, pa.ChunkedArray) else strata)
    stratum = codes.indices.to_numpy(zero_copy_only=False)[heads]
    rank = np.random.default_rng(seed).random(len(heads))
    order = np.lexsort((rank, stratum))                           # by stratum, then at random
    s_sorted, sz_sorted = stratum[order], size[order]
    total = np.bincount(stratum, weights=size)
    cum = np.cumsum(sz_sorted)
    before = np.concatenate([[0], cum[:-1]])
    stratum_start = np.concatenate([[0], np.cumsum(total)[:-1]])[s_sorted]
    middle = (before - stratum_start + sz_sorted / 2) / total[s_sorted]
    bounds = np.cumsum(fractions)[:2]
    split_sorted = np.searchsorted(bounds, middle, side="right").astype(np.int8)
    split_of_head = np.empty(len(heads), dtype=np.int8)
    split_of_head[order] = split_sorted
    head_pos = np.empty(n, dtype=np.int64)
    head_pos[heads] = np.arange(len(heads))
    return split_of_head[head_pos[cluster]]

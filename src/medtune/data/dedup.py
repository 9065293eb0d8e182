"""Duplicate detection: exact (after normalisation) and near-duplicate (MinHash + LSH).

Exact duplicates share a 128-bit fingerprint of the normalised question + answer.

Near duplicates are compared on character 3-gram shingles (about a Chinese word and a half, so a few
changed characters leave most shingles intact). `medtune.data.kernels` computes, in one compiled pass
over each row's bytes, the MinHash signature of question + answer, the signature of the question alone
and the fingerprint. Per row we keep the LSH band keys (each band's slots folded into one integer) and
an 8-bit-per-slot sketch of the signature; rows sharing a band key are candidate pairs, each checked
against the threshold by its sketches' agreement, and the connected components of the confirmed pairs
are the clusters. The banding is chosen per threshold (`lsh_bands`) so that a pair at the threshold is
proposed with 99% probability.

Default dedup threshold 0.8 (question + answer): on the real sample, pairs at ≥ 0.8 are one answer with
a few characters changed; between 0.5 and 0.8 there are many pairs that share only a templated answer
to different questions, which are different training examples. The split clusters the question alone at
a lower threshold (see `medtune.data.split`).

    >>> cols = sketch_rows(questions, answers, Sketcher(0.8, 64), Sketcher(0.6, 64))   # doctest: +SKIP
    >>> near_duplicate_groups(cols["qa_bands"], cols["qa_sketch"], 0.8).label          # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


# ----------------------------------------------------------------------------- texts as arrays

def _string_array(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):  # a single chunk as it is: `combine_chunks` would copy it
        arr = arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    return arr


def utf8_buffers(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A string array's UTF-8 bytes (uint8) and its n + 1 offsets into them, without copying."""
    texts = _string_array(texts)
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int32, count=len(texts) + 1, offset=texts.offset * 4)
    data = texts.buffers()[2]
    return (np.frombuffer(data, dtype=np.uint8) if data is not None and data.size else np.zeros(1, np.uint8)), offsets


# ----------------------------------------------------------------------------- LSH

def lsh_bands(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows per band): the most selective banding that still proposes a pair of Jaccard
    ``threshold`` with probability ≥ ``recall``, using ``bands * rows <= num_perm`` signature slots."""
    for r in range(num_perm, 0, -1):
        b = num_perm // r
        if 1 - (1 - threshold ** r) ** b >= recall:
            return b, r
    return num_perm, 1


@dataclasses.dataclass(frozen=True)
class Sketcher:
    """How shingles become LSH band keys and a compact signature for checking candidate pairs.

    ``sketch`` keeps the low 8 bits of each MinHash slot (b-bit minwise hashing): two slots agree by
    chance with probability 1/256, which `similarity_of` corrects for, so 1 byte per slot estimates the
    Jaccard similarity almost as well as 4.
    """

    threshold: float
    num_perm: int = 128
    seed: int = 0
    recall: float = 0.99

    @property
    def bands(self) -> tuple[int, int]:
        return lsh_bands(self.threshold, self.num_perm, self.recall)

    def params(self) -> tuple[np.ndarray, np.ndarray]:
        from medtune.data.kernels import hash_params

        return hash_params(self.num_perm, self.seed)


def sketch_rows(question: pa.Array | pa.ChunkedArray, answer: pa.Array | pa.ChunkedArray, qa: Sketcher,
                q: Sketcher) -> dict[str, pa.Array]:
    """Per row, for the pipeline's table: ``qa_bands``/``qa_sketch`` (question + "\\n" + answer, for
    dedup), ``q_bands``/``q_sketch`` (question alone, for the split) and ``qa_print`` (128-bit
    fingerprint of question + answer, for exact duplicates); shingles are character 3-grams.
    """
    from medtune.data.kernels import sketch_kernel

    question, answer = _string_array(question), _string_array(answer)
    n = len(question)
    (qa_b, qa_r), (q_b, q_r) = qa.bands, q.bands
    out = {"qa_bands": np.zeros((n, qa_b), np.uint32), "qa_sketch": np.zeros((n, qa.num_perm), np.uint8),
           "q_bands": np.zeros((n, q_b), np.uint32), "q_sketch": np.zeros((n, q.num_perm), np.uint8),
           "qa_print": np.zeros((n, 2), np.uint64)}
    if n:
        sketch_kernel(*utf8_buffers(question), *utf8_buffers(answer), *qa.params(), *q.params(), qa_b, qa_r, q_b, q_r,
                      out["qa_bands"], out["qa_sketch"], out["q_bands"], out["q_sketch"], out["qa_print"])
    return {
        "qa_bands": _fixed_list(out["qa_bands"]), "qa_sketch": _fixed_binary(out["qa_sketch"]),
        "q_bands": _fixed_list(out["q_bands"]), "q_sketch": _fixed_binary(out["q_sketch"]),
        "qa_print": _fixed_binary(out["qa_print"].view(np.uint8)),
    }


def _fixed_list(m: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(m.ravel()), m.shape[1])


def _fixed_binary(m: np.ndarray) -> pa.Array:
    m = np.ascontiguousarray(m)
    width = m.shape[1] * m.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(m), [None, pa.py_buffer(m.tobytes())])


def _matrix(arr: pa.Array | pa.ChunkedArray, dtype: type) -> np.ndarray:
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
        flat = arr.flatten()
        return flat.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(arr), width)
    width = arr.type.byte_width
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8)[arr.offset * width:(arr.offset + len(arr)) * width]
    return data.reshape(len(arr), width)


@dataclasses.dataclass
class Groups:
    """Near-duplicate clusters: ``label`` (per row, the cluster's first row), and per row the estimated
    Jaccard similarity to that first row (1.0 for the first row itself)."""

    label: np.ndarray
    similarity: np.ndarray
    pairs: int      # candidate pairs checked
    confirmed: int  # pairs at or above the threshold (less the margin)

    @property
    def is_first(self) -> np.ndarray:
        return self.label == np.arange(len(self.label))

    def sizes(self) -> np.ndarray:
        return np.bincount(self.label, minlength=len(self.label))[self.label]


def near_duplicate_groups(bands: pa.Array | pa.ChunkedArray | np.ndarray, sketch: pa.Array | pa.ChunkedArray | np.ndarray,
                          threshold: float, margin: float = 0.0, rows: np.ndarray | None = None) -> Groups:
    """Cluster rows whose estimated Jaccard similarity is ≥ ``threshold - margin``.

    ``bands``/``sketch`` come from a `Sketcher` (Arrow columns or their numpy matrices). Rows sharing a
    band key are candidate pairs (in a bucket of at most `BUCKET_ALL_PAIRS` rows every pair, so two
    twins are compared even when the bucket's first row is an unrelated collision; in a larger bucket
    each row with the bucket's first row and the row before it, which keeps the work linear); pairs that
    pass the threshold are linked, and the connected components are the clusters
    (`medtune.data.kernels.link_band`: union-find, pairs already in one cluster are not compared).
    ``margin`` > 0 trades larger clusters for fewer twins missed because of the estimate's noise (the
    split uses it). ``rows``: cluster only these rows of the matrices (the result is indexed like ``rows``).
    """
    from medtune.data.kernels import link_band, roots

    keys = bands if isinstance(bands, np.ndarray) else _matrix(bands, np.uint32)
    low = np.ascontiguousarray(sketch if isinstance(sketch, np.ndarray) else _matrix(sketch, np.uint8))
    rows = np.arange(len(keys), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    n = len(rows)
    label = np.arange(n)
    similarity = np.ones(n, dtype=np.float32)
    if n < 2:
        return Groups(label, similarity, 0, 0)
    slots = low.shape[1]
    # similarity_of(...) >= t  <=>  equal slots >= slots * (t * (1 - 1/256) + 1/256)
    t = threshold - margin - 1e-6
    need = max(0, int(np.ceil(slots * (t * (1 - 1 / 256) + 1 / 256) - 1e-9)))
    parent = np.arange(n, dtype=np.int64)
    counts = np.zeros(2, dtype=np.int64)
    local = np.arange(n, dtype=np.uint64)

    def band(b: int) -> np.ndarray:
        keyed = (keys[rows, b].astype(np.uint64) << np.uint64(32)) | local
        keyed.sort()  # by key, then row: a bucket's first row is its earliest
        return keyed

    with ThreadPoolExecutor(1) as pool:  # the next band is sorted while this one is linked
        nxt = pool.submit(band, 0)
        for b in range(keys.shape[1]):
            keyed = nxt.result()
            if b + 1 < keys.shape[1]:
                nxt = pool.submit(band, b + 1)
            link_band(keyed, parent, low, rows, need, BUCKET_ALL_PAIRS, counts)
    label = roots(parent)
    moved = np.flatnonzero(label != np.arange(n))
    similarity[moved] = similarity_of(low, rows[label[moved]], rows[moved])
    return Groups(label, similarity, int(counts[0]), int(counts[1]))


BUCKET_ALL_PAIRS = 16  # rows sharing a band key are all compared in buckets up to this size


def similarity_of(low: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of rows ``a[i]`` and ``b[i]`` from their 8-bit sketches."""
    from medtune.data.kernels import agreement

    agree = agreement(np.ascontiguousarray(low), np.asarray(a, np.int64), np.asarray(b, np.int64))
    return np.clip((agree - 1 / 256) / (1 - 1 / 256), 0.0, 1.0)


# ----------------------------------------------------------------------------- exact

def exact_duplicate_of(keys: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
    """Per row, the index of the first row with the same key (itself when it is the first).

    ``keys``: strings, or fingerprints (`sketch_rows`' ``qa_print``, or its (rows, 16) uint8 matrix).
    """
    if isinstance(keys, np.ndarray):
        n = len(keys)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        lanes = np.ascontiguousarray(keys).view(np.uint64).reshape(n, -1)
        order = np.lexsort(lanes.T[::-1])  # stable: each run of equal keys starts with its first row
        ordered = lanes[order]
        new = np.ones(n, dtype=bool)
        new[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
        first = np.empty(n, dtype=np.int64)
        first[order] = order[np.flatnonzero(new)][np.cumsum(new) - 1]
        return first
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    codes = pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False)
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.full(codes.max() + 1, len(codes), dtype=np.int64)
    np.minimum.at(first, codes, np.arange(len(codes)))
    return first[codes]

"""Duplicate detection: exact (after normalisation) and near-duplicate (MinHash + LSH, via `rensa`).

Exact duplicates share a 128-bit BLAKE2b fingerprint of the normalised question + answer.

Near duplicates are compared on character 3-gram shingles (about a Chinese word and a half, so a few
changed characters leave most shingles intact). numpy turns a batch of texts into shingle hashes in
bulk (no Python object per shingle) and `rensa` computes their R-MinHash signatures in Rust
(`digest_matrix_from_flat_token_hashes`). Per row we keep the LSH band keys (each band's slots folded
into one integer) and an 8-bit-per-slot sketch of the signature; rows sharing a band key are candidate
pairs, each checked against the threshold by its sketches' agreement, and the connected components of
the confirmed pairs are the clusters. The banding is chosen per threshold (`lsh_bands`) so that a pair
at the threshold is proposed with 99% probability.

Default dedup threshold 0.8 (question + answer): on the real sample, pairs at ≥ 0.8 are one answer with
a few characters changed; between 0.5 and 0.8 there are many pairs that share only a templated answer
to different questions, which are different training examples. The split clusters the question alone at
a lower threshold (see `medtune.data.split`).

    >>> cols = sketch_rows(questions, answers, Sketcher(0.8, 64), Sketcher(0.6, 64))   # doctest: +SKIP
    >>> near_duplicate_groups(cols["qa_bands"], cols["qa_sketch"], 0.8).label          # doctest: +SKIP
"""
from __future__ import annotations

import array
import dataclasses
import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_MIX1 = np.uint64(0x9E3779B97F4A7C15)
CHUNK_ROWS = 20_000  # rows per batch: bounds the shingle arrays (~100 MB for Toyhom-sized rows)


# ----------------------------------------------------------------------------- shingles and signatures

def _string_array(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    return arr


def codepoints(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Every character of ``texts`` as one flat uint32 array, and each text's start in it (n + 1 offsets)."""
    texts = _string_array(texts)
    rows = len(texts)
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int32, count=rows + 1, offset=texts.offset * 4)
    data = texts.buffers()[2]
    raw = bytes(memoryview(data)[offsets[0]:offsets[-1]]) if data is not None and rows else b""
    # One decode/encode of the whole batch gives every character as a uint32 code point.
    cp = np.frombuffer(raw.decode("utf-8").encode("utf-32-le"), dtype=np.uint32)
    chars = pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
    return cp, np.concatenate([[0], np.cumsum(chars)])


def shingle_hashes(cp: np.ndarray, bounds: np.ndarray, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of each text's character ``n``-grams, flat, and each text's offsets into them (uint64, for rensa).

    ``cp``/``bounds`` come from `codepoints`. A text shorter than ``n`` characters is one shingle
    (itself); an empty text has none.
    """
    lengths = np.diff(bounds)
    m = max(len(cp) - n + 1, 0)
    # n code points (21 bits each) packed into one integer: distinct n-grams, distinct values (n <= 3).
    tokens = cp[:m].astype(np.uint64)
    for k in range(1, n):
        tokens <<= np.uint64(21)
        tokens |= cp[k:m + k]
    # An n-gram starting in the last n-1 positions of a text runs into the next one: drop those (this
    # also drops every position of a text shorter than n, all of which lie that close to its end).
    valid = np.ones(m, dtype=bool)
    for k in range(1, n):
        idx = bounds[1:] - k
        valid[idx[(idx >= 0) & (idx < m)]] = False
    tokens = tokens[valid]
    counts = np.maximum(lengths - n + 1, 0)
    short = np.flatnonzero((lengths > 0) & (lengths < n))
    if len(short):  # a short text is one shingle: its code points, tagged with its length
        vals = np.zeros(len(short), np.uint64)
        for k in range(n - 1):
            has = lengths[short] > k
            vals[has] = (vals[has] << np.uint64(21)) | cp[bounds[short][has] + k]
        vals = (vals << np.uint64(2)) | lengths[short].astype(np.uint64)
        tokens = np.insert(tokens, (np.cumsum(counts) - counts)[short], vals)
        counts[short] = 1
    # Spread the packed code points over all 64 bits (one multiply-xorshift round) before rensa hashes them.
    tokens *= _MIX1
    tokens ^= tokens >> np.uint64(29)
    return tokens, np.concatenate([[0], np.cumsum(counts)]).astype(np.uint64)


def fingerprints(texts: pa.Array, size: int = 16) -> np.ndarray:
    """A ``size``-byte BLAKE2b digest of each text's UTF-8 bytes, as a (rows, size) uint8 array."""
    texts = _string_array(texts)
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int32, count=len(texts) + 1, offset=texts.offset * 4)
    data = memoryview(texts.buffers()[2] or b"")
    bounds = offsets.tolist()
    # No Arrow kernel hashes a string to a stable digest; hashlib over buffer slices is ~1 µs a row.
    digests = b"".join(hashlib.blake2b(data[a:b], digest_size=size).digest() for a, b in zip(bounds, bounds[1:]))
    return np.frombuffer(digests, dtype=np.uint8).reshape(len(texts), size)


def _digest(tokens: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int):
    import rensa  # noqa: PLC0415  (compiled; only the data commands need it)

    return rensa.RMinHash.digest_matrix_from_flat_token_hashes(tokens, offsets, num_perm, seed)


def signatures(tokens: np.ndarray, offsets: np.ndarray, num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """MinHash signatures (rensa R-MinHash) of each row's shingles, as a (rows, num_perm) uint32 array.

    rensa hands the matrix over only as Python lists (`to_rows`), the main cost here: keep batches small.
    """
    flat = array.array("I")
    for row in _digest(tokens, offsets, num_perm, seed).to_rows():  # rensa returns Python lists only
        flat.extend(row)
    return np.frombuffer(flat, dtype=np.uint32).reshape(len(offsets) - 1, num_perm)


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

    def __call__(self, tokens: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(band keys (rows, bands) uint32, sketch (rows, num_perm) uint8) from `shingle_hashes` output."""
        b, r = self.bands
        sig = signatures(tokens, offsets, self.num_perm, self.seed)
        key = np.zeros((len(sig), b), np.uint64)
        folded = sig[:, : b * r].reshape(len(sig), b, r)
        for k in range(r):
            key *= np.uint64(0x100000001B3)
            key ^= folded[:, :, k]
        key ^= key >> np.uint64(32)
        return key.astype(np.uint32), sig.astype(np.uint8)


def sketch_rows(question: pa.Array | pa.ChunkedArray, answer: pa.Array | pa.ChunkedArray, qa: Sketcher,
                q: Sketcher, ngram: int = 3) -> dict[str, pa.Array]:
    """Per row, for the pipeline's table: ``qa_bands``/``qa_sketch`` (question + answer, for dedup),
    ``q_bands``/``q_sketch`` (question alone, for the split) and ``qa_print`` (128-bit fingerprint of
    question + answer, for exact duplicates).
    """
    question, answer = _string_array(question), _string_array(answer)
    n = len(question)
    parts: dict[str, list[np.ndarray]] = {"qa_bands": [], "qa_sketch": [], "q_bands": [], "q_sketch": [], "qa_print": []}
    for start in range(0, n, CHUNK_ROWS):
        qs = question.slice(start, CHUNK_ROWS)
        joined = pc.binary_join_element_wise(qs, answer.slice(start, CHUNK_ROWS), "\n")
        for name, sketcher, texts in (("qa", qa, joined), ("q", q, qs)):
            keys, low = sketcher(*shingle_hashes(*codepoints(texts), ngram))
            parts[f"{name}_bands"].append(keys)
            parts[f"{name}_sketch"].append(low)
        parts["qa_print"].append(fingerprints(joined))
    if n == 0:
        parts = {"qa_bands": [np.zeros((0, qa.bands[0]), np.uint32)], "qa_sketch": [np.zeros((0, qa.num_perm), np.uint8)],
                 "q_bands": [np.zeros((0, q.bands[0]), np.uint32)], "q_sketch": [np.zeros((0, q.num_perm), np.uint8)],
                 "qa_print": [np.zeros((0, 16), np.uint8)]}
    out = {k: np.concatenate(v) for k, v in parts.items()}
    return {
        "qa_bands": _fixed_list(out["qa_bands"]), "qa_sketch": _fixed_binary(out["qa_sketch"]),
        "q_bands": _fixed_list(out["q_bands"]), "q_sketch": _fixed_binary(out["q_sketch"]),
        "qa_print": _fixed_binary(out["qa_print"]),
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


def near_duplicate_groups(bands: pa.Array | pa.ChunkedArray, sketch: pa.Array | pa.ChunkedArray,
                          threshold: float, margin: float = 0.0, threads: int = 2) -> Groups:
    """Cluster rows whose estimated Jaccard similarity is ≥ ``threshold - margin``.

    ``bands``/``sketch`` come from a `Sketcher`. Rows sharing a band key are candidate pairs (see
    `_band_pairs`); pairs that pass the threshold are linked, and the connected components are the
    clusters. ``margin`` > 0 trades larger clusters for fewer twins missed
    because of the estimate's noise (the split uses it).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    keys = _matrix(bands, np.uint32)
    low = _matrix(sketch, np.uint8)
    n = len(keys)
    label = np.arange(n)
    similarity = np.ones(n, dtype=np.float32)
    if n < 2:
        return Groups(label, similarity, 0, 0)
    with ThreadPoolExecutor(threads) as pool:  # numpy sorts without the GIL
        found = list(pool.map(lambda b: _band_pairs(keys[:, b]), range(keys.shape[1])))
    pair = np.concatenate([f for f in found]) if found else np.zeros(0, np.int64)
    pair.sort()
    pair = pair[np.concatenate([[True], pair[1:] != pair[:-1]])] if len(pair) else pair
    left, right = pair // n, pair % n
    ok = similarity_of(low, left, right) >= threshold - margin - 1e-6
    graph = coo_matrix((np.ones(int(ok.sum()), np.int8), (left[ok], right[ok])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    first = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    label = first[comp]
    moved = np.flatnonzero(label != np.arange(n))
    similarity[moved] = similarity_of(low, label[moved], moved)
    return Groups(label, similarity, int(len(left)), int(ok.sum()))


BUCKET_ALL_PAIRS = 16  # rows sharing a band key are all compared in buckets up to this size


def _band_pairs(key: np.ndarray, cap: int = BUCKET_ALL_PAIRS) -> np.ndarray:
    """Candidate pairs of rows sharing this band's key, as ``low * n + high`` row indices.

    In a bucket of at most ``cap`` rows every pair is a candidate, so two twins are compared even when
    the bucket's first row is an unrelated collision; a larger bucket (a common key) pairs each row with
    the bucket's first row and with the row before it, which keeps the work linear.
    """
    n = len(key)
    order = np.argsort(key, kind="stable")  # equal keys keep input order: the run's head is its first row
    sk = key[order]
    new_run = np.concatenate([[True], sk[1:] != sk[:-1]])
    run = np.cumsum(new_run) - 1
    small = np.bincount(run)[run] <= cap
    head = order[np.maximum.accumulate(np.where(new_run, np.arange(n), 0))]
    pairs = [head[~new_run].astype(np.int64) * n + order[~new_run]]
    for d in range(1, cap):
        same = np.zeros(n, dtype=bool)
        same[d:] = run[d:] == run[:-d]
        if d > 1:
            same &= small
        i = np.flatnonzero(same)
        if len(i) == 0:
            break
        a, b = order[i - d], order[i]  # a < b: stable order within a run
        pairs.append(a.astype(np.int64) * n + b)
    return np.concatenate(pairs)


def similarity_of(low: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
    """Estimated Jaccard similarity of rows ``a[i]`` and ``b[i]`` from their 8-bit sketches."""
    agree = np.empty(len(a), dtype=np.float32)
    for s in range(0, len(a), chunk):
        agree[s:s + chunk] = (low[a[s:s + chunk]] == low[b[s:s + chunk]]).mean(axis=1)
    return np.clip((agree - 1 / 256) / (1 - 1 / 256), 0.0, 1.0)


# ----------------------------------------------------------------------------- exact

def exact_duplicate_of(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Per row, the index of the first row with the same key (itself when it is the first).

    ``keys``: strings or fixed-size binary fingerprints (`sketch_rows`' ``qa_print``).
    """
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    codes = pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False)
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.full(codes.max() + 1, len(codes), dtype=np.int64)
    np.minimum.at(first, codes, np.arange(len(codes)))
    return first[codes]

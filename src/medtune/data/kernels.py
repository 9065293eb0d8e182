"""Compiled kernels (numba) over Arrow string buffers: the per-row work of `medtune data prepare`.

Each kernel reads a string array's UTF-8 bytes and offsets as they lie in Arrow memory (see
`medtune.data.dedup.utf8_buffers`) and does a row's whole work in one pass, with nothing per
character or shingle stored: the pipeline's per-row Python/regex passes over 800,000 rows were its
main cost. Kernels (each section below says more):

* `sketch_kernel` — MinHash signatures and fingerprints (`medtune.data.dedup`);
* `sentence_spans`, `drop_spans` — answer sentences, their keys, boilerplate removal (`medtune.data.clean`);
* `normalise_kernel`, `merge_kernel` — text normalisation and the title merge, the same rules as the
  regex versions in `medtune.data.clean` (the tests compare them);
* `link_band`, `roots`, `agreement` — near-duplicate clusters from LSH buckets (union-find);
* `interleave3` — the chat ``messages`` column's texts;
* `gb18030_to_utf8` — GB18030 bytes to UTF-8 in one pass (Python's codec makes a ``str`` and encodes it again);
* `char_ngram_counts` — the department classifier's hashed character and character-pair counts.

numba compiles each on its first call and caches the machine code on disk (`warm_up`).

**MinHash** (`sketch_kernel`). For every row the kernel reads the question's and the answer's bytes straight from their Arrow
buffers, decodes the characters, forms the character 3-gram shingles of ``question + "\\n" + answer``
and keeps, for each of ``num_perm`` hash functions, the smallest hash of any shingle (k-permutation
MinHash). The shingles that lie wholly inside the question update a second signature (the question
alone, for the split), and two 64-bit hash lanes over all characters give the row's 128-bit
fingerprint (exact duplicates). Nothing per shingle is stored: a row's work stays in the CPU cache.

Why not `rensa`: its batch API hands the signature matrix back only as Python lists, and turning
800,000 × 128 values into Python ints and back cost three times its hashing (measured: 5.9 s of
`to_rows` and array building against 1.5 s of hashing for the 800,000-row benchmark corpus), on top of
the numpy shingle arrays it needs as input (7.3 s, memory bound). This kernel does all of it in one pass.

Hash functions: shingle x (3 code points of 21 bits, packed, then mixed) → ``(a_i * x + b_i) >> 32``
mod 2^64 with random odd ``a_i`` (multiply-add-shift, a universal family from 64 to 32 bits).
A text shorter than 3 characters is one shingle (its code points, tagged with its length).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit

EMPTY = np.uint64(0xFFFFFFFF)  # a slot no shingle reached (empty text)


def hash_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(a, b)`` coefficients of ``num_perm`` hash functions, from ``seed``."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64 - 1, size=num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
    b = rng.integers(0, 2**64 - 1, size=num_perm, dtype=np.uint64, endpoint=True)
    return a, b


@njit(cache=True, nogil=True, inline="always")
def _mix(x):
    x = x * np.uint64(0x9E3779B97F4A7C15)
    return x ^ (x >> np.uint64(29))


@njit(cache=True, nogil=True, inline="always")
def _update(mins, a, b, x):
    for i in range(mins.shape[0]):
        mins[i] = min(mins[i], (a[i] * x + b[i]) >> np.uint64(32))


@njit(cache=True, nogil=True, inline="always")
def _short(c0, c1, c2, length):
    """The one shingle of a text of 1 or 2 characters (its last ``length`` code points, tagged)."""
    v = np.uint64(0)
    if length == 2:
        v = (c1 << np.uint64(21)) | c2
    elif length == 1:
        v = c2
    return _mix((v << np.uint64(2)) | np.uint64(length))


@njit(cache=True, nogil=True, inline="always")
def _finish(mins, bands, rows, keys, low, r):
    for band in range(bands):
        key = np.uint64(0)
        for k in range(rows):
            key = (key * np.uint64(0x100000001B3)) ^ mins[band * rows + k]
        key ^= key >> np.uint64(32)
        keys[r, band] = np.uint32(key & np.uint64(0xFFFFFFFF))
    for i in range(mins.shape[0]):
        low[r, i] = np.uint8(mins[i] & np.uint64(0xFF))


@njit(cache=True, nogil=True)
def sketch_kernel(q_data, q_off, a_data, a_off, qa_a, qa_b, q_a, q_b, qa_bands, qa_rows, q_bands, q_rows,
                  qa_keys, qa_low, q_keys, q_low, prints):
    """Fill ``qa_keys/qa_low`` (question + "\\n" + answer), ``q_keys/q_low`` (question) and ``prints``.

    ``*_data``: a string array's UTF-8 bytes (uint8); ``*_off``: its n + 1 offsets into them.
    """
    n = q_off.shape[0] - 1
    qa_mins = np.empty(qa_a.shape[0], np.uint64)
    q_mins = np.empty(q_a.shape[0], np.uint64)
    for r in range(n):
        qa_mins[:] = EMPTY
        q_mins[:] = EMPTY
        c0 = np.uint64(0)
        c1 = np.uint64(0)
        c2 = np.uint64(0)
        k = 0  # characters so far
        nq = 0  # characters of the question
        h1 = np.uint64(0xCBF29CE484222325)
        h2 = np.uint64(0x84222325CBF29CE4)
        for part in range(3):  # the question, the "\n" between, the answer
            if part == 0:
                data, p, end = q_data, q_off[r], q_off[r + 1]
            elif part == 1:
                data, p, end = q_data, 0, 1  # (one character, not read from data)
            else:
                data, p, end = a_data, a_off[r], a_off[r + 1]
            while p < end:
                if part == 1:
                    cp = np.uint64(10)
                    p += 1
                else:
                    b0 = np.uint64(data[p])
                    if b0 < 0x80:
                        cp = b0
                        p += 1
                    elif b0 < 0xE0:
                        cp = ((b0 & np.uint64(0x1F)) << np.uint64(6)) | (np.uint64(data[p + 1]) & np.uint64(0x3F))
                        p += 2
                    elif b0 < 0xF0:
                        cp = (((b0 & np.uint64(0x0F)) << np.uint64(12)) | ((np.uint64(data[p + 1]) & np.uint64(0x3F)) << np.uint64(6))
                              | (np.uint64(data[p + 2]) & np.uint64(0x3F)))
                        p += 3
                    else:
                        cp = (((b0 & np.uint64(0x07)) << np.uint64(18)) | ((np.uint64(data[p + 1]) & np.uint64(0x3F)) << np.uint64(12))
                              | ((np.uint64(data[p + 2]) & np.uint64(0x3F)) << np.uint64(6)) | (np.uint64(data[p + 3]) & np.uint64(0x3F)))
                        p += 4
                c0, c1, c2 = c1, c2, cp
                k += 1
                h1 = (h1 ^ cp) * np.uint64(0x100000001B3)
                h2 = (h2 ^ (cp + np.uint64(k))) * np.uint64(0xFF51AFD7ED558CCD)
                h2 ^= h2 >> np.uint64(31)
                if k >= 3:
                    x = _mix((c0 << np.uint64(42)) | (c1 << np.uint64(21)) | c2)
                    _update(qa_mins, qa_a, qa_b, x)
                    if part == 0:
                        _update(q_mins, q_a, q_b, x)
            if part == 0:
                nq = k
                if 0 < nq < 3:
                    _update(q_mins, q_a, q_b, _short(c0, c1, c2, nq))
        if k < 3:  # (k >= 1: the "\n" is always there)
            _update(qa_mins, qa_a, qa_b, _short(c0, c1, c2, k))
        _finish(qa_mins, qa_bands, qa_rows, qa_keys, qa_low, r)
        _finish(q_mins, q_bands, q_rows, q_keys, q_low, r)
        # fmix64 of each lane, with the length and the question's length mixed in
        for lane in range(2):
            h = (h1 if lane == 0 else h2) ^ (np.uint64(k) << np.uint64(32)) ^ np.uint64(nq)
            h ^= h >> np.uint64(33)
            h *= np.uint64(0xFF51AFD7ED558CCD)
            h ^= h >> np.uint64(33)
            h *= np.uint64(0xC4CEB9FE1A85EC53)
            h ^= h >> np.uint64(33)
            prints[r, lane] = h


# ----------------------------------------------------------------------------- sentences
# A sentence ends after a run of SENTENCE_ENDS characters; its key is the sentence without the KEY_TRIM
# characters around it (`medtune.sentences`, whose Python functions are the reference: the tests
# compare the two). Keys are compared by a 64-bit hash of their UTF-8 bytes.


def char_classes(ends: str, trim: str) -> np.ndarray:
    """A lookup table per code point below 0x10000: bit 1 if in ``ends``, bit 2 if in ``trim``."""
    table = np.zeros(0x10000, dtype=np.uint8)
    for c in ends:
        table[ord(c)] |= 1
    for c in trim:
        table[ord(c)] |= 2
    return table


@njit(cache=True, nogil=True, inline="always")
def _decode(data, p):
    """(code point, bytes) of the UTF-8 character at ``data[p]``."""
    b0 = np.int64(data[p])
    if b0 < 0x80:
        return b0, 1
    if b0 < 0xE0:
        return ((b0 & 0x1F) << 6) | (np.int64(data[p + 1]) & 0x3F), 2
    if b0 < 0xF0:
        return ((b0 & 0x0F) << 12) | ((np.int64(data[p + 1]) & 0x3F) << 6) | (np.int64(data[p + 2]) & 0x3F), 3
    return (((b0 & 0x07) << 18) | ((np.int64(data[p + 1]) & 0x3F) << 12) | ((np.int64(data[p + 2]) & 0x3F) << 6)
            | (np.int64(data[p + 3]) & 0x3F)), 4


@njit(cache=True, nogil=True, inline="always")
def key_hash(data, start, end):
    """64-bit hash of ``data[start:end]`` (FNV-1a, then fmix64)."""
    h = np.uint64(0xCBF29CE484222325)
    for i in range(start, end):
        h = (h ^ np.uint64(data[i])) * np.uint64(0x100000001B3)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


@njit(cache=True, nogil=True, inline="always")
def _emit(row, span, hashes, nchars, m, r, start, end, key_start, key_end, chars, data):
    row[m] = r
    span[m, 0] = start
    span[m, 1] = end
    span[m, 2] = key_start
    span[m, 3] = key_end
    hashes[m] = key_hash(data, key_start, key_end)
    nchars[m] = chars
    return m + 1


@njit(cache=True, nogil=True)
def sentence_spans(data, off, cls, min_chars):
    """Every sentence of every row: (row, (start, end, key start, key end), key hash, key characters).

    ``cls``: `char_classes` (bit 1: ends a sentence, bit 2: trimmed from keys). Sentences whose key has
    fewer than ``min_chars`` characters are left out. Byte positions index ``data``.
    """
    n = off.shape[0] - 1
    cap = 16 + 8 * n
    row = np.empty(cap, np.int64)
    span = np.empty((cap, 4), np.int64)
    hashes = np.empty(cap, np.uint64)
    nchars = np.empty(cap, np.int64)
    m = 0
    for r in range(n):
        p = np.int64(off[r])
        end = np.int64(off[r + 1])
        if m + (end - p) + 1 > cap:  # a row has at most one sentence per byte, plus one
            cap = 2 * cap + (end - p) + 1
            row = _grow1(row, cap)
            span = _grow2(span, cap)
            hashes = _grow1(hashes, cap)
            nchars = _grow1(nchars, cap)
        start = p
        in_run = False
        key_start = np.int64(-1)
        key_end = np.int64(-1)
        chars = np.int64(0)
        pending = np.int64(0)
        while p < end:
            cp, size = _decode(data, p)
            c = cls[cp] if cp < 0x10000 else np.uint8(0)
            is_end = (c & 1) != 0
            if in_run and not is_end:  # the sentence [start, p) is complete
                if key_start >= 0 and chars >= min_chars:
                    m = _emit(row, span, hashes, nchars, m, r, start, p, key_start, key_end, chars, data)
                start = p
                key_start = -1
                chars = 0
                pending = 0
            in_run = is_end
            if (c & 2) != 0:
                pending += 1
            else:
                if key_start < 0:
                    key_start = p
                    pending = 0
                chars += pending + 1
                pending = 0
                key_end = p + size
            p += size
        if key_start >= 0 and chars >= min_chars:
            m = _emit(row, span, hashes, nchars, m, r, start, end, key_start, key_end, chars, data)
    return row[:m], span[:m], hashes[:m], nchars[:m]


@njit(cache=True)
def _grow1(a, cap):
    out = np.empty(cap, a.dtype)
    out[:a.shape[0]] = a
    return out


@njit(cache=True)
def _grow2(a, cap):
    out = np.empty((cap, a.shape[1]), a.dtype)
    out[:a.shape[0]] = a
    return out


@njit(cache=True, nogil=True)
def drop_spans(data, off, row, span, drop):
    """The rows' texts without the sentences ``drop`` marks: (new UTF-8 bytes, new int32 offsets).

    ``row``/``span`` come from `sentence_spans` (in row order).
    """
    n = off.shape[0] - 1
    out = np.empty(max(1, off[n] - off[0]), np.uint8)
    new_off = np.empty(n + 1, np.int32)
    q = 0
    j = 0
    m = row.shape[0]
    for r in range(n):
        new_off[r] = q
        p = np.int64(off[r])
        while j < m and row[j] == r:
            if drop[j]:
                s, e = span[j, 0], span[j, 1]
                for i in range(p, s):
                    out[q] = data[i]
                    q += 1
                p = e
            j += 1
        for i in range(p, np.int64(off[r + 1])):
            out[q] = data[i]
            q += 1
    new_off[n] = q
    return out[:q], new_off


# ----------------------------------------------------------------------------- LSH clusters
# Rows sharing a band key are candidate pairs; a pair whose sketches agree on at least ``need`` slots is
# linked (union-find, the smaller row index as the root, so each row's root is its cluster's first row).
# A pair already in one cluster is not compared again.


@njit(cache=True, nogil=True, inline="always")
def _find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(cache=True, nogil=True, inline="always")
def _agree(low, a, b):
    same = 0
    for k in range(low.shape[1]):
        same += low[a, k] == low[b, k]
    return same


@njit(cache=True, nogil=True)
def link_band(sorted_keys, parent, low, rows, need, cap, counts):
    """Link the candidate pairs of one band. ``sorted_keys``: (key << 32 | row), sorted; row ``i``'s
    sketch is ``low[rows[i]]``.

    A bucket of at most ``cap`` rows compares all its pairs; a larger one compares each row with the
    bucket's first row and with the row before it. ``counts``: [pairs compared, pairs linked], added to.
    """
    n = sorted_keys.shape[0]
    start = 0
    while start < n:
        key = sorted_keys[start] >> np.uint64(32)
        end = start + 1
        while end < n and (sorted_keys[end] >> np.uint64(32)) == key:
            end += 1
        size = end - start
        if size > 1:
            for i in range(start + 1, end):
                b = np.int64(sorted_keys[i] & np.uint64(0xFFFFFFFF))
                lo = start if size <= cap else max(start, i - 1)
                for j in range(lo, i):
                    if size > cap and j != start and j != i - 1:
                        continue
                    a = np.int64(sorted_keys[j] & np.uint64(0xFFFFFFFF))
                    ra = _find(parent, a)
                    rb = _find(parent, b)
                    if ra == rb:
                        continue
                    counts[0] += 1
                    if _agree(low, rows[a], rows[b]) >= need:
                        counts[1] += 1
                        if ra < rb:
                            parent[rb] = ra
                        else:
                            parent[ra] = rb
                if size > cap and i - 1 != start:  # the bucket's first row as well
                    a = np.int64(sorted_keys[start] & np.uint64(0xFFFFFFFF))
                    ra = _find(parent, a)
                    rb = _find(parent, b)
                    if ra != rb:
                        counts[0] += 1
                        if _agree(low, rows[a], rows[b]) >= need:
                            counts[1] += 1
                            if ra < rb:
                                parent[rb] = ra
                            else:
                                parent[ra] = rb
        start = end


@njit(cache=True, nogil=True)
def roots(parent):
    """Each row's cluster root (its first row), with the paths compressed."""
    out = np.empty(parent.shape[0], np.int64)
    for i in range(parent.shape[0]):
        out[i] = _find(parent, i)
    return out


@njit(cache=True, nogil=True)
def agreement(low, a, b):
    """Share of equal sketch slots of rows ``a[i]`` and ``b[i]``."""
    out = np.empty(a.shape[0], np.float32)
    for i in range(a.shape[0]):
        out[i] = _agree(low, a[i], b[i]) / low.shape[1]
    return out


# ----------------------------------------------------------------------------- normalisation
# `medtune.data.clean.normalise_text` as one compiled pass per row: the same rules as its regex steps,
# applied in the same order (each step a pass over the row's code points, run only when the row holds a
# character the step needs). `clean.normalise_text_reference` keeps the regex steps; the tests compare
# the two on the whole sample.

HAN, CN_PUNCT_BIT, RUN_BIT, LEAD_BIT, WORD_BIT, END_BIT, SPACE_BIT = 1, 2, 4, 8, 16, 32, 64
MAY_HOLD_CONTACT, HAS_BRACKET = 1, 2  # per-row flags of `normalise_kernel`


@njit(cache=True, nogil=True, inline="always")
def _cls(cls, cp):
    return cls[cp] if cp < cls.shape[0] else np.uint8(0)


@njit(cache=True, nogil=True, inline="always")
def _is_s(cp):  # RE2's \s: [\t\n\f\r ]
    return cp == 32 or cp == 9 or cp == 10 or cp == 12 or cp == 13


@njit(cache=True, nogil=True, inline="always")
def _pair(b, m, x, y):
    b[m] = x
    b[m + 1] = y
    return m + 2


@njit(cache=True, nogil=True)
def _ascii_to_cn(a, n, b, mark, cn, cls):
    """(\\p{Han}) ?MARK|MARK ?(\\p{Han}) → \\1CN\\2"""
    i = 0
    m = 0
    while i < n:
        c = a[i]
        if _cls(cls, c) & HAN:  # Han, an optional space, the mark
            end = i + 1 if i + 1 < n and a[i + 1] == mark else (
                i + 2 if i + 2 < n and a[i + 1] == 32 and a[i + 2] == mark else 0)
            if end:
                m = _pair(b, m, c, cn)
                i = end + 1
                continue
        elif c == mark:  # the mark, an optional space, Han
            han = i + 1 if i + 1 < n and (_cls(cls, a[i + 1]) & HAN) else (
                i + 2 if i + 2 < n and a[i + 1] == 32 and (_cls(cls, a[i + 2]) & HAN) else 0)
            if han:
                m = _pair(b, m, cn, a[han])
                i = han + 1
                continue
        b[m] = c
        m += 1
        i += 1
    return m


@njit(cache=True, nogil=True)
def _full_stop(a, n, b, cls):
    """(\\p{Han})\\.(\\p{Han}|$) → \\1。\\2"""
    i = 0
    m = 0
    while i < n:
        c = a[i]
        if (_cls(cls, c) & HAN) and i + 1 < n and a[i + 1] == 46 and (i + 2 == n or _cls(cls, a[i + 2]) & HAN):
            m = _pair(b, m, c, 0x3002)
            i += 2
            if i < n:  # the Han character after the stop is part of the match
                b[m] = a[i]
                m += 1
                i += 1
            continue
        b[m] = c
        m += 1
        i += 1
    return m


@njit(cache=True, nogil=True)
def _whitespace(a, n, b, cls):
    """\\r\\n? → \\n; [ \\t\\f\\v]+ → ' '; ' ?\\n\\s*' → \\n; ' +([CN])' → \\1; '([CN]) +' → \\1 (five passes)."""
    m = 0
    i = 0
    while i < n:  # \r\n? → \n
        if a[i] == 13:
            b[m] = 10
            i += 2 if i + 1 < n and a[i + 1] == 10 else 1
        else:
            b[m] = a[i]
            i += 1
        m += 1
    n, m, i = m, 0, 0
    while i < n:  # [ \t\f\v]+ → ' '
        c = b[i]
        if c == 32 or c == 9 or c == 12 or c == 11:
            while i < n and (b[i] == 32 or b[i] == 9 or b[i] == 12 or b[i] == 11):
                i += 1
            a[m] = 32
        else:
            a[m] = c
            i += 1
        m += 1
    n, m, i = m, 0, 0
    while i < n:  # ' ?\n\s*' → \n
        c = a[i]
        if c == 10 or (c == 32 and i + 1 < n and a[i + 1] == 10):
            i += 1 if c == 10 else 2
            while i < n and _is_s(a[i]):
                i += 1
            b[m] = 10
        else:
            b[m] = c
            i += 1
        m += 1
    n, m, i = m, 0, 0
    while i < n:  # ' +([CN_PUNCT])' → \1
        c = b[i]
        if c == 32:
            j = i
            while j < n and b[j] == 32:
                j += 1
            if j < n and (_cls(cls, b[j]) & CN_PUNCT_BIT):
                a[m] = b[j]
                m += 1
                i = j + 1
                continue
        a[m] = c
        m += 1
        i += 1
    n, m, i = m, 0, 0
    while i < n:  # '([CN_PUNCT]) +' → \1
        c = a[i]
        b[m] = c
        m += 1
        i += 1
        if (_cls(cls, c) & CN_PUNCT_BIT) and i < n and a[i] == 32:
            while i < n and a[i] == 32:
                i += 1
    return m


@njit(cache=True, nogil=True)
def _repeats(a, n, b, cls):
    """[，、；：]*。[，、；：。]* → 。; ([，、；：])[，、；：]+ → \\1; ！{2,} → ！; ？{2,} → ？ (four passes)."""
    m = 0
    i = 0
    while i < n:
        j = i
        while j < n and (_cls(cls, a[j]) & RUN_BIT):
            j += 1
        if j < n and a[j] == 0x3002:
            k = j + 1
            while k < n and ((_cls(cls, a[k]) & RUN_BIT) or a[k] == 0x3002):
                k += 1
            b[m] = 0x3002
            m += 1
            i = k
        else:
            b[m] = a[i]
            m += 1
            i += 1
    n, m, i = m, 0, 0
    while i < n:
        c = b[i]
        a[m] = c
        m += 1
        i += 1
        if _cls(cls, c) & RUN_BIT:
            while i < n and (_cls(cls, b[i]) & RUN_BIT):
                i += 1
    n, m, i = m, 0, 0
    while i < n:
        c = a[i]
        b[m] = c
        m += 1
        i += 1
        if c == 0xFF01 or c == 0xFF1F:
            while i < n and a[i] == c:
                i += 1
    return m


@njit(cache=True, nogil=True, inline="always")
def _put(out, q, cp):
    if cp < 0x80:
        out[q] = cp
        return q + 1
    if cp < 0x800:
        out[q] = 0xC0 | (cp >> 6)
        out[q + 1] = 0x80 | (cp & 0x3F)
        return q + 2
    if cp < 0x10000:
        out[q] = 0xE0 | (cp >> 12)
        out[q + 1] = 0x80 | ((cp >> 6) & 0x3F)
        out[q + 2] = 0x80 | (cp & 0x3F)
        return q + 3
    out[q] = 0xF0 | (cp >> 18)
    out[q + 1] = 0x80 | ((cp >> 12) & 0x3F)
    out[q + 2] = 0x80 | ((cp >> 6) & 0x3F)
    out[q + 3] = 0x80 | (cp & 0x3F)
    return q + 4


@njit(cache=True, nogil=True, inline="always")
def _copy(out, q, data, start, end):
    """``data[start:end]`` into ``out`` at ``q``; the position after it."""
    out[q:q + end - start] = data[start:end]
    return q + end - start


@njit(cache=True, nogil=True)
def normalise_kernel(data, off, translate, cls):
    """Normalise every row (rules: `medtune.data.clean`); (new UTF-8 bytes, new int32 offsets, flags).

    ``translate``: per BMP code point its replacement, -1 to delete it (identity where unchanged);
    ``cls``: per code point the class bits above. ``flags``: per row, `_contact_flags`.
    """
    n = off.shape[0] - 1
    out = np.empty(16 + np.int64(off[n] - off[0]) * 3, np.uint8)  # a 1-byte mark may become 3 bytes
    new_off = np.empty(n + 1, np.int32)
    flags = np.zeros(n, np.uint8)
    a = np.empty(64, np.int32)
    b = np.empty(64, np.int32)
    q = 0
    marks = np.array([44, 63, 33, 58, 59], np.int32)          # , ? ! : ;
    cns = np.array([0xFF0C, 0xFF1F, 0xFF01, 0xFF1A, 0xFF1B], np.int32)
    for r in range(n):
        new_off[r] = q
        p, end = np.int64(off[r]), np.int64(off[r + 1])
        if end - p + 4 > a.shape[0]:
            a = np.empty(2 * (end - p) + 4, np.int32)
            b = np.empty(2 * (end - p) + 4, np.int32)
        k = 0
        start = p
        need_marks = 0
        need_dot = False
        need_space = False
        need_runs = False
        same = True  # no character translated or deleted
        prev = -1
        prev_run = False
        while p < end:
            cp, size = _decode(data, p)
            p += size
            if cp < 0x10000:
                was = cp
                cp = translate[cp]
                if cp != was:
                    same = False
                    if cp < 0:
                        continue
            a[k] = cp
            k += 1
            # `_repeats` changes a text only where a run mark (，、；：) or 。 follows another, or ！/？ repeats
            run = cp == 0x3002 or (cp >= 0x80 and (_cls(cls, cp) & RUN_BIT) != 0)
            if (run and prev_run) or ((cp == 0xFF01 or cp == 0xFF1F) and cp == prev):
                need_runs = True
            prev, prev_run = cp, run
            if cp < 0x80:
                if cp == 44:
                    need_marks |= 1
                elif cp == 63:
                    need_marks |= 2
                elif cp == 33:
                    need_marks |= 4
                elif cp == 58:
                    need_marks |= 8
                elif cp == 59:
                    need_marks |= 16
                elif cp == 46:
                    need_dot = True
                elif _is_s(cp) or cp == 11:
                    need_space = True
        untouched = same and not (need_marks or need_dot or need_space or need_runs)
        if need_marks:
            for j in range(5):
                if need_marks & (1 << j):
                    k = _ascii_to_cn(a, k, b, marks[j], cns[j], cls)
                    a, b = b, a
                    need_runs = True
        if need_dot:
            k = _full_stop(a, k, b, cls)
            a, b = b, a
            need_runs = True
        if need_space:
            k = _whitespace(a, k, b, cls)
            a, b = b, a
            need_runs = True  # removing spaces may bring marks together
        if need_runs:
            k = _repeats(a, k, b, cls)
            a, b = b, a
        full = k
        s = 0  # ^[，。！？；：、）》】…\s]+ → '', then outer whitespace (as Arrow's utf8_trim_whitespace)
        while s < k and (_cls(cls, a[s]) & LEAD_BIT):
            s += 1
        while s < k and (_cls(cls, a[s]) & SPACE_BIT):
            s += 1
        while k > s and (_cls(cls, a[k - 1]) & SPACE_BIT):
            k -= 1
        flags[r] = _contact_flags(a, s, k)
        if untouched and s == 0 and k == full:
            q = _copy(out, q, data, start, end)  # the text as it was: its bytes, not re-encoded
        else:
            for j in range(s, k):
                q = _put(out, q, a[j])
    new_off[n] = q
    return out[:q], new_off, flags


@njit(cache=True, nogil=True)
def _contact_flags(a, s, k):
    """MAY_HOLD_CONTACT when the text holds something every contact pattern of `clean.scrub_contacts`
    needs ('@', 3+ digits in a row, 信, www/http/vx/weixin/wechat in any case, a '.' before a letter);
    HAS_BRACKET when it holds '['. A text without the first is left alone by the scrubbing."""
    flags = np.uint8(0)
    digits = 0
    letters = np.uint64(0)  # the last ASCII letters, lower-cased, one per byte
    prev = 0
    for j in range(s, k):
        c = a[j]
        if 48 <= c <= 57:
            digits += 1
            if digits >= 3:
                flags |= MAY_HOLD_CONTACT
        else:
            digits = 0
        lower = c | 32 if (65 <= c <= 90) else c
        if 97 <= lower <= 122:
            letters = (letters << np.uint64(8)) | np.uint64(lower)
            if (letters & np.uint64(0xFFFFFF)) == np.uint64(0x777777) or (letters & np.uint64(0xFFFFFFFF)) == np.uint64(0x68747470) \
                    or (letters & np.uint64(0xFFFF)) == np.uint64(0x7678) \
                    or (letters & np.uint64(0xFFFFFFFFFFFF)) == np.uint64(0x77656978696E) \
                    or (letters & np.uint64(0xFFFFFFFFFFFF)) == np.uint64(0x776563686174):
                flags |= MAY_HOLD_CONTACT
            if prev == 46:
                flags |= MAY_HOLD_CONTACT
        else:
            letters = np.uint64(0)
        if c == 64 or c == 0x4FE1:
            flags |= MAY_HOLD_CONTACT
        elif c == 91:
            flags |= HAS_BRACKET
        prev = c
    return flags


@njit(cache=True, nogil=True)
def merge_kernel(t_data, t_off, a_data, a_off, cls):
    """Title + ask as one question (rules: `medtune.data.clean.merge_question`); (UTF-8 bytes, offsets)."""
    n = t_off.shape[0] - 1
    out = np.empty(16 + np.int64(t_off[n] - t_off[0]) + np.int64(a_off[n] - a_off[0]) + n, np.uint8)
    new_off = np.empty(n + 1, np.int32)
    tk = np.empty(64, np.int32)
    ak = np.empty(256, np.int32)
    q = 0
    for r in range(n):
        new_off[r] = q
        t0, t1 = np.int64(t_off[r]), np.int64(t_off[r + 1])
        a0, a1 = np.int64(a_off[r]), np.int64(a_off[r + 1])
        if t1 - t0 > tk.shape[0]:
            tk = np.empty(2 * (t1 - t0), np.int32)
        if a1 - a0 > ak.shape[0]:
            ak = np.empty(2 * (a1 - a0), np.int32)
        nt = 0
        last = 0
        p = t0
        while p < t1:  # the title's letters and digits, and its last character
            cp, size = _decode(t_data, p)
            p += size
            last = cp
            if _cls(cls, cp) & WORD_BIT:
                tk[nt] = cp
                nt += 1
        redundant = nt == 0
        if not redundant:
            na = 0
            p = a0
            while p < a1:
                cp, size = _decode(a_data, p)
                p += size
                if _cls(cls, cp) & WORD_BIT:
                    ak[na] = cp
                    na += 1
            for i in range(na - nt + 1):  # is the title's key within the ask's?
                j = 0
                while j < nt and ak[i + j] == tk[j]:
                    j += 1
                if j == nt:
                    redundant = True
                    break
        if not redundant:
            for i in range(t0, t1):
                out[q] = t_data[i]
                q += 1
            if a1 > a0 and not (_cls(cls, last) & END_BIT):
                out[q] = 10
                q += 1
        for i in range(a0, a1):
            out[q] = a_data[i]
            q += 1
    new_off[n] = q
    return out[:q], new_off


@njit(cache=True, nogil=True)
def interleave3(x_data, x_off, y_data, y_off, z_data, z_off):
    """Rows x0, y0, z0, x1, y1, z1, ... of three string arrays as one: (UTF-8 bytes, 3n + 1 int32 offsets)."""
    n = x_off.shape[0] - 1
    size = (np.int64(x_off[n] - x_off[0]) + np.int64(y_off[n] - y_off[0]) + np.int64(z_off[n] - z_off[0]))
    out = np.empty(max(1, size), np.uint8)
    offsets = np.empty(3 * n + 1, np.int32)
    q = 0
    for r in range(n):
        offsets[3 * r] = q
        q = _copy(out, q, x_data, x_off[r], x_off[r + 1])
        offsets[3 * r + 1] = q
        q = _copy(out, q, y_data, y_off[r], y_off[r + 1])
        offsets[3 * r + 2] = q
        q = _copy(out, q, z_data, z_off[r], z_off[r + 1])
    offsets[3 * n] = q
    return out[:q], offsets


@njit(cache=True, nogil=True)
def byte_slices(data, starts, ends):
    """``data[starts[i]:ends[i]]`` for each i, as one string array's (bytes, n + 1 int32 offsets)."""
    n = starts.shape[0]
    size = 0
    for i in range(n):
        size += ends[i] - starts[i]
    out = np.empty(max(1, size), np.uint8)
    offsets = np.empty(n + 1, np.int32)
    q = 0
    for i in range(n):
        offsets[i] = q
        q = _copy(out, q, data, starts[i], ends[i])
    offsets[n] = q
    return out[:q], offsets


_SHORT_ESCAPES = {8: ord("b"), 9: ord("t"), 10: ord("n"), 12: ord("f"), 13: ord("r"), 34: ord('"'), 92: ord("\\")}
JSON_ESCAPE = np.zeros(128, np.uint8)  # per ASCII byte: 0 as it is, 1 as \u00XX, else the letter after "\"
JSON_ESCAPE[:32] = 1
for _byte, _letter in _SHORT_ESCAPES.items():
    JSON_ESCAPE[_byte] = _letter


@njit(cache=True, nogil=True)
def json_strings(data, off, valid, escape):
    """Each row as a JSON value, as ``json.dumps(text, ensure_ascii=False)`` writes it (``null`` where not
    ``valid``): (UTF-8 bytes, n + 1 int32 offsets). ``escape``: `JSON_ESCAPE`."""
    n = off.shape[0] - 1
    out = np.empty(16 + 6 * np.int64(off[n] - off[0]) + 6 * n, np.uint8)  # a control byte becomes 6
    new_off = np.empty(n + 1, np.int32)
    q = 0
    for r in range(n):
        new_off[r] = q
        if not valid[r]:
            out[q], out[q + 1], out[q + 2], out[q + 3] = 110, 117, 108, 108  # null
            q += 4
            continue
        out[q] = 34
        q += 1
        run = off[r]  # the start of the bytes copied as they are
        for i in range(off[r], off[r + 1]):
            c = data[i]
            if c < 128 and escape[c]:
                q = _copy(out, q, data, run, i)
                run = i + 1
                out[q] = 92
                if escape[c] == 1:  # u00 and two lower-case hex digits
                    out[q + 1], out[q + 2], out[q + 3] = 117, 48, 48
                    out[q + 4] = 48 + (c >> 4)  # (c < 32)
                    out[q + 5] = 48 + (c & 15) if (c & 15) < 10 else 87 + (c & 15)
                    q += 6
                else:
                    out[q + 1] = escape[c]
                    q += 2
        q = _copy(out, q, data, run, off[r + 1])
        out[q] = 34
        q += 1
    new_off[n] = q
    return out[:q], new_off


# ----------------------------------------------------------------------------- GB18030 → UTF-8

GB18030_BMP_FOUR = 39420  # four-byte codes 81 30 81 30 … 84 31 A4 39: the rest of the BMP
GB18030_SUPPLEMENTARY = 189000  # the linear index of 90 30 81 30 = U+10000


@functools.cache
def gb18030_tables() -> tuple[np.ndarray, np.ndarray]:
    """The code points of GB18030's two-byte codes (lead 81-FE × trail 40-FE) and of its four-byte codes
    in the BMP, 0 where Python's codec refuses one: taken from that codec, so the kernel decodes as it does."""
    two = np.zeros(126 * 191, dtype=np.uint32)
    for lead in range(0x81, 0xFF):
        for trail in range(0x40, 0xFF):
            try:
                text = bytes((lead, trail)).decode("gb18030")
            except UnicodeDecodeError:
                continue
            if len(text) == 1 and ord(text) < 0x10000:  # (so UTF-8 takes at most 3/2 of the bytes)
                two[(lead - 0x81) * 191 + trail - 0x40] = ord(text)
    four = np.zeros(GB18030_BMP_FOUR, dtype=np.uint32)
    for index in range(GB18030_BMP_FOUR):
        b1, rest = divmod(index, 12600)
        b2, rest = divmod(rest, 1260)
        b3, b4 = divmod(rest, 10)
        try:
            text = bytes((0x81 + b1, 0x30 + b2, 0x81 + b3, 0x30 + b4)).decode("gb18030")
        except UnicodeDecodeError:
            continue
        if len(text) == 1:
            four[index] = ord(text)
    return two, four


@njit(cache=True, nogil=True)
def gb18030_to_utf8(src, two, four, out):
    """GB18030 bytes ``src`` as UTF-8 in ``out`` (at least 3/2 of ``len(src)`` bytes); the bytes written, or
    ``-1 - i`` for the first sequence, at ``i``, it cannot decode (the caller lets Python's codec report it).

    Two-byte codes and the BMP's four-byte codes come from `gb18030_tables`; the four-byte codes from
    90 30 81 30 map linearly onto U+10000-U+10FFFF."""
    n = src.shape[0]
    i = 0
    q = 0
    while i < n:
        b = np.int64(src[i])
        if b < 0x80:
            out[q] = b
            q += 1
            i += 1
            continue
        if b == 0x80 or b == 0xFF or i + 1 >= n:
            return -1 - i
        c = np.int64(src[i + 1])
        if 0x40 <= c <= 0xFE:
            cp = np.int64(two[(b - 0x81) * 191 + c - 0x40])
            step = 2
        elif 0x30 <= c <= 0x39 and i + 3 < n:
            d, e = np.int64(src[i + 2]), np.int64(src[i + 3])
            if not (0x81 <= d <= 0xFE and 0x30 <= e <= 0x39):
                return -1 - i
            index = (((b - 0x81) * 10 + (c - 0x30)) * 126 + (d - 0x81)) * 10 + (e - 0x30)
            if index < GB18030_BMP_FOUR:
                cp = np.int64(four[index])
            elif GB18030_SUPPLEMENTARY <= index < GB18030_SUPPLEMENTARY + 0x100000:
                cp = 0x10000 + index - GB18030_SUPPLEMENTARY
            else:
                return -1 - i
            step = 4
        else:
            return -1 - i
        if cp == 0:
            return -1 - i
        q = _put(out, q, cp)
        i += step
    return q


# ----------------------------------------------------------------------------- classifier features

NGRAM_HASH = np.uint64(0x9E3779B97F4A7C15)  # multiply-shift hashing (Fibonacci) into 2^bits columns


@njit(cache=True, nogil=True)
def char_ngram_counts(data, off, bits):
    """Per text, the hashed columns of its characters and character pairs with their counts, as CSR
    (``indptr``, ``indices`` ascending within a row, ``counts``).

    A character ``c`` is the key ``c``, a pair ``c d`` the key ``(c << 21 | d) | 2^63``; a key's column is
    the top ``bits`` bits of ``key * NGRAM_HASH`` (mod 2^64)."""
    n = off.shape[0] - 1
    indptr = np.zeros(n + 1, dtype=np.int64)
    cap = 2 * (off[n] - off[0]) + 1
    indices = np.empty(cap, dtype=np.int32)
    counts = np.empty(cap, dtype=np.float32)
    cols = np.empty(cap, dtype=np.int64)
    shift = np.uint64(64 - bits)
    tag = np.uint64(1) << np.uint64(63)
    q = 0
    for r in range(n):
        m = 0
        prev = np.uint64(0)
        p = off[r]
        first = True
        while p < off[r + 1]:
            cp, size = _decode(data, p)
            c = np.uint64(cp)
            cols[m] = np.int64((c * NGRAM_HASH) >> shift)
            m += 1
            if not first:
                cols[m] = np.int64((((prev << np.uint64(21)) | c) | tag) * NGRAM_HASH >> shift)
                m += 1
            prev = c
            first = False
            p += size
        row = np.sort(cols[:m])
        i = 0
        while i < m:
            j = i + 1
            while j < m and row[j] == row[i]:
                j += 1
            indices[q] = row[i]
            counts[q] = j - i
            q += 1
            i = j
        indptr[r + 1] = q
    return indptr, indices[:q], counts[:q]


def warm_up() -> float:
    """Load (or, on a first run, compile and cache) every kernel; seconds taken.

    numba compiles a kernel on its first call and keeps the machine code in ``__pycache__`` beside this
    file (``cache=True``): the first `medtune data prepare` after installing pays some seconds once.
    """
    import time

    import pyarrow as pa

    from medtune.data.clean import merge_question, normalise_text, sentence_counts, strip_boilerplate
    from medtune.data.dedup import Sketcher, near_duplicate_groups, sketch_rows, utf8_buffers

    start = time.perf_counter()
    texts = pa.array(["高血压能吃党参吗？多喝水。", "头痛,发热.怎么办"])
    normalise_text(texts)
    merge_question(texts, texts)
    sentence_counts(texts)
    strip_boilerplate(texts, ["多喝水"])
    cols = sketch_rows(texts, texts, Sketcher(0.8, 64), Sketcher(0.6, 64))
    near_duplicate_groups(cols["qa_bands"], cols["qa_sketch"], 0.8)
    interleave3(*(np.zeros(1, np.uint8), np.zeros(2, np.int32)) * 3)
    char_ngram_counts(*utf8_buffers(texts), 18)
    gb18030_to_utf8(np.frombuffer("高血压".encode("gb18030"), np.uint8), *gb18030_tables(), np.empty(16, np.uint8))
    return time.perf_counter() - start

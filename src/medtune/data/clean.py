"""Cleaning, vectorised over Arrow arrays (RE2 regex kernels; Python only where no kernel exists).

Normalisation (`normalise_text`), decided for Chinese medical text:

* full-width letters, digits and symbols (Ａ１％＋…) become ASCII, and U+3000 and other Unicode spaces
  become a plain space; the full-width punctuation that Chinese text uses (，。！？：；（）、“”…) stays;
* ASCII ``, ? ! : ;`` next to a Chinese character become ``，？！：；`` and an ASCII ``.`` between two
  Chinese characters (or ending the text after one) becomes ``。`` — so ``卫生.避免`` reads ``卫生。避免``
  while ``6.1mmol`` and URLs keep theirs;
* whitespace: runs become one space, line breaks are kept (one, without surrounding spaces), spaces
  next to Chinese punctuation and at either end go; zero-width characters go;
* runs of the same mark collapse (``。。`` → ``。``, ``，，`` → ``，``), a full stop absorbs commas next
  to it (``，。`` → ``。``), and leading punctuation goes.

Contact details are replaced, never dropped with their row: URLs → ``[网址]``, e-mail → ``[邮箱]``,
phone numbers (mobile, landline, 400/800) → ``[电话]``, QQ numbers → ``[QQ号]``, WeChat ids → ``[微信号]``.

Boilerplate is learned, not listed: answers are split into sentences (after ``。！？!?；;…`` and line
breaks); a sentence (compared without surrounding punctuation and spaces) is boilerplate when it occurs
in at least ``min_share`` of the distinct answers AND in at least ``min_count`` of them — the share makes
the rule behave the same on 7,000 and 800,000 rows, the count keeps a tiny input from flagging every
repeated sentence. Whole sentences are removed. `remove_boilerplate` applies the learned list to one
generated answer, with the same sentence rule.

    >>> remove_boilerplate("多喝水。祝您早日康复！", ["祝您早日康复！"])
    '多喝水。'
"""
from __future__ import annotations

import functools
import math
import re
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# the sentence helpers later stages use without pyarrow (inference, serving) live in medtune.sentences
from medtune.sentences import (  # noqa: F401  (re-exported: part of this module's interface)
    CN_PUNCT, KEY_TRIM, SENTENCE_ENDS, _key, load_boilerplate, remove_boilerplate, split_sentences)

# ----------------------------------------------------------------------------- patterns

# Full-width forms that become ASCII: everything in FF01-FF5E except the Chinese sentence punctuation.
_KEEP_FULLWIDTH = "！（），：；？"
FULLWIDTH_TABLE = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F) if chr(cp) not in _KEEP_FULLWIDTH}
FULLWIDTH_TABLE.update({cp: 0x20 for cp in (0x3000, 0xA0, 0x202F, 0x205F, *range(0x2000, 0x200B))})
# Zero-width and control characters (but tab and line breaks) go.
FULLWIDTH_TABLE.update({cp: None for cp in (0x200B, 0x200C, 0x200D, 0xFEFF, 0x7F, *range(0x00, 0x09), 0x0B, 0x0C,
                                            *range(0x0E, 0x20))})
_FULLWIDTH_RE = ("[\\x{ff02}-\\x{ff07}\\x{ff0a}\\x{ff0b}\\x{ff0d}-\\x{ff19}\\x{ff1c}-\\x{ff1e}\\x{ff20}-\\x{ff5e}"
                 "\\x{3000}\\x{a0}\\x{2000}-\\x{200d}\\x{202f}\\x{205f}\\x{feff}\\x{00}-\\x{08}\\x{0b}\\x{0c}"
                 "\\x{0e}-\\x{1f}\\x{7f}]")
_ASCII_TO_CN = {",": "，", "?": "？", "!": "！", ":": "：", ";": "；"}

# Normalisation groups: (cheap pre-filter, regex steps). A group's steps run only on the rows its filter
# selects — most rows need few of them — and all groups run only on rows `_NEEDS_NORMALISING` selects.
_PUNCT_GROUPS: list[tuple[str, list[tuple[str, str]]]] = [
    *[(re.escape(a), [(f"(\\p{{Han}}) ?{re.escape(a)}|{re.escape(a)} ?(\\p{{Han}})", f"\\1{c}\\2")])
      for a, c in _ASCII_TO_CN.items()],
    (r"\.", [(r"(\p{Han})\.(\p{Han}|$)", r"\1。\2")]),
    (r"\s", [
        (r"\r\n?", "\n"),
        (r"[ \t\f\v]+", " "),
        (r" ?\n\s*", "\n"),
        (f" +([{CN_PUNCT}])", r"\1"),
        (f"([{CN_PUNCT}]) +", r"\1"),
    ]),
    (r"[，、；：。][，、；：。]|！！|？？", [
        (r"[，、；：]*。[，、；：。]*", "。"),
        (r"([，、；：])[，、；：]+", r"\1"),
        (r"！{2,}", "！"),
        (r"？{2,}", "？"),
    ]),
    (r"^[，。！？；：、）》】…\s]", [(r"^[，。！？；：、）》】…\s]+", "")]),
]
_NEEDS_NORMALISING = "|".join(f"(?:{f})" for f, _ in _PUNCT_GROUPS)

PLACEHOLDERS = {"email": "[邮箱]", "url": "[网址]", "qq": "[QQ号]", "wechat": "[微信号]", "phone": "[电话]"}
_SCRUB_STEPS: list[tuple[str, str]] = [
    ("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    ("url", r"(?i)(?:https?://|www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+"
            r"|\b[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.(?:com|cn|net|org|cc|info|top)\b(?:/[A-Za-z0-9\-._~/?#=&%]*)?"),
    ("qq", r"(?i)(?:qq|扣扣|企鹅)(?:号码|号|群)?\s*[:：]?\s*\d{5,11}"),
    ("wechat", r"(?i)(?:微信|weixin|wechat|vx|v信|薇信)(?:号|公众号)?\s*[:：]?\s*(?:[A-Za-z][-_A-Za-z0-9]{5,19}|\d{5,11})"),
    ("phone", r"(?:\+?86[- ]?)?\b1[3-9]\d(?:[- ]?\d{4}){2}\b|\b0\d{2,3}[- ]?\d{7,8}\b|\b[48]00[- ]?\d{3}[- ]?\d{4}\b"),
]
_NEEDS_SCRUB = r"(?i)https?:|www\.|\.(?:com|cn|net|org|cc|info|top)\b|\d{5,}|\d{3,4}[- ]\d{3,}|qq|扣扣|企鹅|微信|weixin|wechat|vx|v信|薇信|@"

_TITLE_END = f"[{SENTENCE_ENDS}]$"
_PUNCT_SPACE = r"[^\p{L}\p{N}]+"


# ----------------------------------------------------------------------------- helpers

def _flat(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One array (a single chunk as it is: `combine_chunks` would copy it)."""
    if isinstance(arr, pa.ChunkedArray):
        return arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    return arr


def _where(arr: pa.Array, pattern: str, fn) -> pa.Array:
    """``fn`` applied to the rows matching ``pattern`` only (most steps touch a minority of rows)."""
    mask = pc.match_substring_regex(arr, pattern)
    hits = pc.sum(mask).as_py() or 0
    if hits == 0:
        return arr
    if hits == len(arr):
        return fn(arr)
    return pc.replace_with_mask(arr, mask, fn(arr.filter(mask)))


def _translate(arr: pa.Array) -> pa.Array:
    # No Arrow kernel maps characters one-to-one; these rows are few, so Python's str.translate is fine.
    return pa.array([s.translate(FULLWIDTH_TABLE) if s is not None else None for s in arr.to_pylist()], pa.string())


def _steps(arr: pa.Array, steps: Sequence[tuple[str, str]]) -> pa.Array:
    for pattern, repl in steps:
        arr = pc.replace_substring_regex(arr, pattern, repl)
    return arr


# ----------------------------------------------------------------------------- per-row cleaning

def normalise_text(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Whitespace, full-width characters and punctuation made consistent (rules in the module docstring).

    Compiled (`medtune.data.kernels.normalise_kernel`): the regex steps of `normalise_text_reference`
    in one pass per row.
    """
    return normalise_flagged(arr)[0]


def normalise_flagged(arr: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """`normalise_text`, and per row the kernel's flags (`kernels.MAY_HOLD_CONTACT`, `kernels.HAS_BRACKET`)."""
    from medtune.data.dedup import _string_array, utf8_buffers
    from medtune.data.kernels import normalise_kernel

    arr = _string_array(_flat(arr))
    translate, classes = unicode_tables()
    out, offsets, flags = normalise_kernel(*utf8_buffers(arr), translate, classes)
    result = pa.StringArray.from_buffers(len(arr), pa.py_buffer(offsets), pa.py_buffer(out))
    if arr.null_count:
        result = pc.if_else(pc.is_null(arr), pa.scalar(None, pa.string()), result)
    return result, flags


def normalise_text_reference(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`normalise_text` as Arrow regex steps, each on the rows it concerns: the rules' reference."""
    arr = _flat(arr)
    arr = _where(arr, _FULLWIDTH_RE, _translate)
    arr = _where(arr, _NEEDS_NORMALISING, _punctuation)
    return pc.utf8_trim_whitespace(arr)


_TABLES: tuple[np.ndarray, np.ndarray] | None = None


def unicode_tables() -> tuple[np.ndarray, np.ndarray]:
    """(translate, classes) for the kernels: the full-width map, and per code point its class bits
    (``\\p{Han}`` and ``[\\p{L}\\p{N}]`` as RE2 defines them, the punctuation sets of the rules).

    Built once per process (~0.3 s); `set_unicode_tables` hands a built pair to a worker.
    """
    global _TABLES
    if _TABLES is None:
        from medtune.data import kernels as K

        translate = np.arange(0x10000, dtype=np.int32)
        for cp, to in FULLWIDTH_TABLE.items():
            translate[cp] = -1 if to is None else to
        every = pa.array(["".join(chr(c) for c in range(0x40000) if not 0xD800 <= c < 0xE000)])
        classes = np.zeros(0x40000, dtype=np.uint8)
        for bit, pattern in ((K.HAN, r"\P{Han}"), (K.WORD_BIT, r"[^\p{L}\p{N}]")):
            kept = pc.replace_substring_regex(every, pattern, "")[0].as_py()
            classes[np.frombuffer(kept.encode("utf-32-le"), dtype=np.uint32)] |= bit
        for bit, chars in ((K.CN_PUNCT_BIT, CN_PUNCT), (K.RUN_BIT, "，、；："), (K.LEAD_BIT, "，。！？；：、）》】…\t\n\f\r "),
                           (K.END_BIT, SENTENCE_ENDS)):
            for c in chars:
                classes[ord(c)] |= bit
        bmp = pa.array([chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000])
        blank = pc.equal(pc.utf8_trim_whitespace(bmp), "").to_numpy(zero_copy_only=False)
        classes[[ord(c) for c, b in zip(bmp.to_pylist(), blank) if b]] |= K.SPACE_BIT  # Arrow's whitespace
        _TABLES = translate, classes
    return _TABLES


def set_unicode_tables(tables: tuple[np.ndarray, np.ndarray]) -> None:
    global _TABLES
    _TABLES = tables


def _punctuation(arr: pa.Array) -> pa.Array:
    for filter_, steps in _PUNCT_GROUPS:
        arr = _where(arr, filter_, lambda a, steps=steps: _steps(a, steps))
    return arr


def scrub_contacts(arr: pa.Array | pa.ChunkedArray, candidates: np.ndarray | None = None) -> pa.Array:
    """URLs, e-mail addresses, phone numbers, QQ numbers and WeChat ids replaced by placeholders.

    ``candidates``: the rows that may hold any (`normalise_flagged`'s MAY_HOLD_CONTACT); the others are
    not searched.
    """
    arr = _flat(arr)

    def scrub(a: pa.Array) -> pa.Array:
        return _where(a, _NEEDS_SCRUB, lambda b: _steps(b, [(p, PLACEHOLDERS[kind]) for kind, p in _SCRUB_STEPS]))

    if candidates is None:
        return scrub(arr)
    if not candidates.any():
        return arr
    mask = pa.array(candidates)
    before = arr.filter(mask)
    after = scrub(before)
    if after is before or after.equals(before):  # the usual case: the whole array would be copied for nothing
        return arr
    return pc.replace_with_mask(arr, mask, after)


def count_placeholders(*arrays: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """How many of each scrub placeholder the arrays hold (for the manifest)."""
    counts = dict.fromkeys(PLACEHOLDERS, 0)
    for arr in arrays:
        for chunk in _chunks(arr):
            chunk = chunk.filter(pc.match_substring(chunk, "["))
            for kind, ph in PLACEHOLDERS.items():
                counts[kind] += int(pc.sum(pc.count_substring(chunk, ph)).as_py() or 0)
    return counts


def _chunks(arr: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(arr.chunks) if isinstance(arr, pa.ChunkedArray) else [arr]


def punctuation_free(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Letters and digits only (Chinese characters included): for punctuation-insensitive comparison."""
    return pc.replace_substring_regex(_flat(arr), _PUNCT_SPACE, "")


def merge_question(title: pa.Array, ask: pa.Array) -> pa.Array:
    """``title`` + ``ask`` as one question; the title is left out when the ask already contains it.

    Containment is compared on letters and digits only. A title that does not end a sentence is joined
    with a line break. Compiled (`medtune.data.kernels.merge_kernel`); `merge_question_reference` is
    the same rule in Arrow and Python.
    """
    from medtune.data.dedup import _string_array, utf8_buffers
    from medtune.data.kernels import merge_kernel

    title, ask = _string_array(_flat(title)), _string_array(_flat(ask))
    out, offsets = merge_kernel(*utf8_buffers(title), *utf8_buffers(ask), unicode_tables()[1])
    return pa.StringArray.from_buffers(len(title), pa.py_buffer(offsets), pa.py_buffer(out))


def merge_question_reference(title: pa.Array, ask: pa.Array) -> pa.Array:
    title, ask = _flat(title), _flat(ask)
    t_key, a_key = punctuation_free(title).to_pylist(), punctuation_free(ask).to_pylist()
    redundant = pa.array([not t or t in a for t, a in zip(t_key, a_key)], pa.bool_())
    sep = pc.if_else(pc.match_substring_regex(title, _TITLE_END), "", "\n")
    sep = pc.if_else(pc.equal(pc.utf8_length(ask), 0), "", sep)
    joined = pc.binary_join_element_wise(title, sep, ask, "")
    return pc.if_else(redundant, ask, joined)


def normalise_table(raw: pa.Table, scrub: bool = True) -> pa.Table:
    """The raw rows plus ``question`` and ``clean_answer``: normalised, contacts scrubbed, title merged.

    Row-local, so it runs where each file is read (in the load workers).
    """
    from medtune.data.kernels import HAS_BRACKET, MAY_HOLD_CONTACT

    brackets = np.zeros(raw.num_rows, dtype=bool)  # rows that may hold a placeholder (see count_placeholders)

    def one(col: str) -> pa.Array:
        arr, flags = normalise_flagged(raw.column(col))
        contact = (flags & MAY_HOLD_CONTACT) != 0
        brackets[:] |= contact if scrub else False
        brackets[:] |= (flags & HAS_BRACKET) != 0
        return scrub_contacts(arr, contact) if scrub else arr

    question = merge_question(one("title"), one("ask"))
    answer = one("answer")
    return (raw.append_column("question", question).append_column("clean_answer", answer)
            .append_column("may_hold_placeholders", pa.array(brackets)))


# ----------------------------------------------------------------------------- sentences and boilerplate

def _sentence_spans(answers: pa.Array, min_chars: int):
    """`kernels.sentence_spans` of a string array: (data, row, span, key hash) per sentence."""
    from medtune.data.dedup import utf8_buffers
    from medtune.data.kernels import sentence_spans

    data, off = utf8_buffers(answers)
    row, span, hashes, _ = sentence_spans(data, off, _classes(), min_chars)
    return data, row, span, hashes


@functools.cache
def _classes() -> np.ndarray:
    from medtune.data.kernels import char_classes

    return char_classes(SENTENCE_ENDS, KEY_TRIM)


def _key_texts(data: np.ndarray, span: np.ndarray, idx: np.ndarray) -> pa.Array:
    """The keys of the sentences ``idx`` (their bytes ``span[:, 2:4]`` in ``data``) as a string array."""
    from medtune.data.kernels import byte_slices

    out, offsets = byte_slices(data, np.ascontiguousarray(span[idx, 2]), np.ascontiguousarray(span[idx, 3]))
    return pa.StringArray.from_buffers(len(idx), pa.py_buffer(offsets), pa.py_buffer(out))


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    """The kernels' 64-bit hash of each sentence key (its UTF-8 bytes)."""
    from medtune.data.kernels import key_hash

    out = np.empty(len(keys), np.uint64)
    for i, k in enumerate(keys):
        b = np.frombuffer(k.encode("utf-8"), np.uint8) if k else np.zeros(0, np.uint8)
        out[i] = key_hash(b, 0, len(b))
    return out


def sentence_counts(answers: pa.Array | pa.ChunkedArray, answer_ids: pa.Array | np.ndarray | None = None,
                    min_answers: int = 1, min_chars: int = 2) -> tuple[pa.Table, int]:
    """(table of sentence ``key`` → ``answers`` holding it, for keys in ≥ ``min_answers``; distinct answers).

    ``answer_ids`` (e.g. fingerprints) identify copies of one answer, which count once; by default the
    answers are compared as strings. Keys shorter than ``min_chars`` characters are not counted.
    """
    answers = _flat(answers)
    if answer_ids is None:
        answer_ids = pc.dictionary_encode(answers).indices
    ids = answer_ids if isinstance(answer_ids, np.ndarray) else _flat(answer_ids).to_numpy(zero_copy_only=False)
    ids = np.asarray(ids).astype(np.uint64, copy=False)
    distinct = len(np.unique(ids))
    data, row, span, hashes = _sentence_spans(answers, min_chars)
    owner = ids[row]
    order = np.lexsort((owner, hashes))  # by key, then answer
    h, o = hashes[order], owner[order]
    pair = np.ones(len(h), dtype=bool)
    pair[1:] = (h[1:] != h[:-1]) | (o[1:] != o[:-1])  # the first sentence of each (key, answer)
    h, first = h[pair], order[pair]
    new_key = np.ones(len(h), dtype=bool)
    new_key[1:] = h[1:] != h[:-1]
    starts = np.flatnonzero(new_key)
    counts = np.diff(np.append(starts, len(h)))
    keep = counts >= min_answers
    keys = _key_texts(data, span, first[starts[keep]])
    return pa.table({"key": keys, "answers": pa.array(counts[keep], pa.int64())}), distinct


def boilerplate_from_counts(parts: Sequence[pa.Table], answers: int, min_share: float = 0.003,
                            min_count: int = 10) -> list[dict]:
    """Merge per-part `sentence_counts` and keep the keys frequent enough; most frequent first.

    A part may leave out keys below ``ceil(min_count / parts)`` answers: a key that reaches
    ``min_count`` overall reaches that in at least one part.
    """
    if answers == 0 or not parts:
        return []
    counts = pa.concat_tables(parts)
    if len(parts) > 1:
        counts = counts.group_by("key").aggregate([("answers", "sum")]).rename_columns(["key", "answers"])
    need = max(min_count, math.ceil(min_share * answers))
    frequent = counts.filter(pc.greater_equal(counts["answers"], need)).to_pylist()
    out = [{"sentence": f["key"], "count": int(f["answers"]), "share": round(f["answers"] / answers, 6)}
           for f in frequent]
    return sorted(out, key=lambda e: (-e["count"], e["sentence"]))


def learn_boilerplate(answers: pa.Array | pa.ChunkedArray, min_share: float = 0.003, min_count: int = 10) -> list[dict]:
    """Sentences found in ≥ ``min_share`` (and ≥ ``min_count``) of the distinct answers, most frequent first.

    Each entry: ``sentence`` (without surrounding punctuation), ``count`` (answers), ``share``.
    """
    counts, distinct = sentence_counts(answers)
    return boilerplate_from_counts([counts], distinct, min_share, min_count)


def strip_boilerplate(answers: pa.Array | pa.ChunkedArray, phrases: Iterable[str],
                      threads: int = 2) -> tuple[pa.ChunkedArray, dict[str, int]]:
    """Remove whole sentences whose key is one of ``phrases``' keys; also how often each key was removed.

    A text that lost a sentence is trimmed of surrounding whitespace, as `remove_boilerplate` does;
    the others are returned as they were. Chunks run on ``threads`` threads (the kernels release the GIL).
    """
    from concurrent.futures import ThreadPoolExecutor

    keys = sorted({k for k in (_key(p) for p in phrases) if k})
    chunks = _chunks(answers)
    if not keys:
        return pa.chunked_array(chunks, pa.string()), {}
    hashes = key_hashes(keys)
    order = np.argsort(hashes)
    hashes, keys = hashes[order], [keys[i] for i in order]
    if threads > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(threads) as pool:
            done = list(pool.map(lambda c: _strip_chunk(c, hashes), chunks))
    else:
        done = [_strip_chunk(c, hashes) for c in chunks]
    removed = np.zeros(len(keys), dtype=np.int64)
    for _, counts in done:
        removed += counts
    return (pa.chunked_array([c for c, _ in done], pa.string()),
            {keys[i]: int(removed[i]) for i in np.flatnonzero(removed)})


def _strip_chunk(answers: pa.Array, hashes: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    from medtune.data.kernels import drop_spans

    answers = _flat(answers)
    if pa.types.is_large_string(answers.type):
        answers = answers.cast(pa.string())
    data, row, span, found = _sentence_spans(answers, 1)
    pos = np.minimum(np.searchsorted(hashes, found), len(hashes) - 1)
    drop = hashes[pos] == found
    counts = np.bincount(pos[drop], minlength=len(hashes))
    if not drop.any():
        return answers, counts
    from medtune.data.dedup import utf8_buffers

    out, offsets = drop_spans(*utf8_buffers(answers), row, span, drop)
    stripped = pa.StringArray.from_buffers(len(answers), pa.py_buffer(offsets), pa.py_buffer(out))
    if answers.null_count:
        stripped = pc.if_else(pc.is_null(answers), pa.scalar(None, pa.string()), stripped)
    changed = np.zeros(len(answers), dtype=bool)
    changed[row[drop]] = True
    mask = pa.array(changed)
    return pc.replace_with_mask(stripped, mask, pc.utf8_trim_whitespace(stripped.filter(mask))), counts


# ----------------------------------------------------------------------------- lengths

def lengths(arr: pa.Array | pa.ChunkedArray, count_tokens: Callable[[list[str]], list[int]] | None = None,
            batch_size: int = 4096) -> np.ndarray:
    """Characters per row, or tokens when ``count_tokens`` (a batch tokenizer) is given."""
    if count_tokens is None:
        return pc.utf8_length(arr).to_numpy(zero_copy_only=False)
    out = np.empty(len(arr), dtype=np.int64)
    for start in range(0, len(arr), batch_size):
        batch = arr.slice(start, batch_size).to_pylist()
        out[start:start + len(batch)] = count_tokens(batch)
    return out

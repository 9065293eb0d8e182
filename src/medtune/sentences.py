"""Sentences of Chinese medical text: splitting, their comparison keys, and removing boilerplate ones.

Plain Python (no pyarrow), so inference and serving use the same rules as `medtune.data.clean`, which
re-exports these and holds their Arrow twins for whole corpora.
"""
from __future__ import annotations

import re
from typing import Iterable

SENTENCE_ENDS = "。！？!?；;…\n"
CN_PUNCT = "，。！？；：、“”‘’（）《》【】…"
_SENTENCE_RUN_PY = re.compile(f"([{re.escape(SENTENCE_ENDS)}]+)")
_SEP = "\x1f"  # a control character: normalisation removes those, so it never occurs in cleaned text
# A sentence's key: the sentence without surrounding punctuation and spaces.
KEY_TRIM = SENTENCE_ENDS + CN_PUNCT + " \t,.:;'\"()[]<>-—~·*#"


def split_sentences(text: str) -> list[str]:
    """One text's sentences, each with its ending marks (the Python twin of the Arrow split)."""
    return [s for s in _SENTENCE_RUN_PY.sub("\\1" + _SEP, text).split(_SEP) if s]


def _key(sentence: str) -> str:
    return sentence.strip(KEY_TRIM)


def remove_boilerplate(text: str, phrases: Iterable[str]) -> str:
    """``text`` without its sentences that are boilerplate (``phrases``: learned sentences or their keys).

    Later stages pass a generated answer and the list from ``boilerplate.json``.
    """
    keys = phrases if isinstance(phrases, (set, frozenset)) else {_key(p) for p in phrases}
    kept = [s for s in split_sentences(text) if _key(s) not in keys]
    return "".join(kept).strip()


def load_boilerplate(path) -> list[str]:
    """The learned sentences from a ``boilerplate.json`` written by `medtune data prepare`."""
    import json
    from pathlib import Path

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [e["sentence"] for e in data.get("sentences", [])]

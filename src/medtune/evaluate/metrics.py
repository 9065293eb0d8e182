"""Reference-based answer metrics: BLEU-4 and ROUGE-1/2/L as the Chinese fine-tuning papers report them,
corpus BLEU, and length / repetition statistics.

The primary protocol is that of ChatGLM-6B's p-tuning evaluation script (``ptuning/main.py``), which
the Toyhom dataset's README table and LLaMA-Factory's ``ComputeSimilarity`` follow:

* BLEU-4: for each answer, nltk's ``sentence_bleu`` of the answer's characters against the reference's
  characters, smoothed with ``SmoothingFunction().method3``; x 100, rounded to 4 decimals; then the mean.
* ROUGE-1/2/L: for each answer, the F-scores of ``rouge_chinese.Rouge().get_scores`` on the jieba words
  of answer and reference joined by spaces; x 100, rounded to 4 decimals; then the mean. An answer (or
  reference) with no word scores 0, as in LLaMA-Factory (rouge-chinese raises on it).

Also: corpus BLEU with sacrebleu's Chinese tokeniser (``tokenize="zh"``: one token per CJK character,
13a rules elsewhere), a corpus statistic comparable across papers that report sacreBLEU.

    >>> similarity("高血压患者要低盐饮食", "高血压患者应低盐饮食，规律服药")
    {'bleu-4': 39.912, 'rouge-1': 57.1429, 'rouge-2': 33.3333, 'rouge-l': 57.1429}
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

PROTOCOL = (
    "BLEU-4: mean over answers of nltk sentence_bleu on characters (SmoothingFunction().method3) x 100; "
    "ROUGE-1/2/L: mean over answers of rouge-chinese F-scores on jieba words x 100 (an empty answer scores 0); "
    "each answer's score rounded to 4 decimals before the mean (ChatGLM-6B p-tuning / LLaMA-Factory "
    "protocol). Corpus BLEU: sacrebleu, tokenize='zh'."
)
SIMILARITY_KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def _words(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading chatter goes to stderr otherwise
    return list(jieba.cut(text))


def similarity(prediction: str, reference: str) -> dict[str, float]:
    """BLEU-4 and ROUGE-1/2/L F (x 100, rounded to 4 decimals) of one answer against its reference."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hypothesis, ref_words = _words(prediction), _words(reference)
    if not " ".join(hypothesis).split() or not " ".join(ref_words).split():
        rouge = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        scores = Rouge().get_scores(" ".join(hypothesis), " ".join(ref_words))[0]
        rouge = {k: round(v["f"] * 100, 4) for k, v in scores.items()}
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return {"bleu-4": round(float(bleu) * 100, 4), **rouge}


def similarity_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Means of `similarity` over the answers (the primary protocol's BLEU-4 and ROUGE-1/2/L)."""
    _same_length(predictions, references)
    totals = dict.fromkeys(SIMILARITY_KEYS, 0.0)
    for prediction, reference in zip(predictions, references):
        for key, value in similarity(prediction, reference).items():
            totals[key] += value
    n = max(len(predictions), 1)
    return {key: total / n for key, total in totals.items()}


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100) with its Chinese tokeniser."""
    import sacrebleu

    _same_length(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize="zh").score)


def _same_length(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


# ----------------------------------------------------------------------------- length and repetition

def _chars(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): distinct character n-grams / all character n-grams over all texts.

    Characters (whitespace dropped), as for BLEU: Chinese needs no segmenter. Low values mean the
    answers repeat each other (the same template whatever the question) or themselves. 0 when there is
    no n-gram at all.
    """
    grams: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        grams.update(_ngrams(_chars(text), n))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def repetition_n(text: str, n: int = 4) -> float:
    """Share of an answer's character n-grams that repeat an earlier one (seq-rep-n, Welleck et al., 2019).

    0 for an answer without repeats; a generation stuck in a loop approaches 1.
    """
    grams = _ngrams(_chars(text), n)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def length_stats(
    predictions: Sequence[str],
    references: Sequence[str] | None = None,
    finish_reasons: Sequence[str] | None = None,
) -> dict[str, float | None]:
    """Lengths (characters, whitespace excluded), repetition and truncation of a set of answers.

    Keys: ``distinct-1``, ``distinct-2``, ``rep-4`` (mean `repetition_n`), ``mean_chars``,
    ``ref_mean_chars`` and ``length_ratio`` (answer / reference mean; None without references),
    ``hit_limit`` (share of answers whose ``finish_reason`` is ``"length"``: cut at the token limit;
    None without finish reasons), ``empty`` (share of answers with no character).
    """
    n = len(predictions)
    lengths = [len(_chars(p)) for p in predictions]
    mean = sum(lengths) / n if n else 0.0
    out: dict[str, float | None] = {
        "distinct-1": distinct_n(predictions, 1),
        "distinct-2": distinct_n(predictions, 2),
        "rep-4": sum(repetition_n(p) for p in predictions) / n if n else 0.0,
        "mean_chars": mean,
        "ref_mean_chars": None,
        "length_ratio": None,
        "hit_limit": None,
        "empty": sum(length == 0 for length in lengths) / n if n else 0.0,
    }
    if references is not None:
        _same_length(predictions, references)
        ref_mean = sum(len(_chars(r)) for r in references) / n if n else 0.0
        out["ref_mean_chars"] = ref_mean
        out["length_ratio"] = mean / ref_mean if ref_mean else None
    if finish_reasons is not None:
        _same_length(predictions, finish_reasons)
        out["hit_limit"] = sum(r == "length" for r in finish_reasons) / n if n else 0.0
    return out

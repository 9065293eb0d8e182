"""Relevance: does an answer address the question it was given, rather than some other question?

For each answer, its own question is ranked among ``n_candidates`` questions — itself and distractors
drawn (seeded) from the same sub-department where there are enough, so that the department's vocabulary
alone does not give it away — by the cosine similarity of character 1-2-gram TF-IDF vectors. Reported:
top-1 accuracy (chance: 1 / ``n_candidates``) and mean reciprocal rank. Ties count as a random order
(expected values), so an empty answer, equally far from every question, scores chance, not first.

The vectoriser (sublinear tf, as the department classifier uses) is fitted on the questions and the
*reference* answers when given, so every system is scored in the same vector space. On the shared
sample's prepared splits (7,243 rows, 20 candidates) reference answers rank their question first 53% of
the time (MRR 0.66); answers shuffled among the questions 5% (chance).

An answer that repeats its question would rank it first without answering it, so the share of answers
that mostly copy their question is reported too (`question_containment`), with top-1 over the others.

    >>> r = relevance(questions, answers, groups=sub_departments, references=reference_answers)  # doctest: +SKIP
    >>> r.top1, r.mrr, r.copy_share  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

N_CANDIDATES = 20
# A reference answer of the sample contains at most 57% of its question's character bigrams at the 99th
# percentile, and 0.3% of them reach 0.8: those few do open by repeating the whole question.
COPY_THRESHOLD = 0.8
_NOT_TEXT = re.compile(r"[\W_]+")


@dataclasses.dataclass
class RelevanceResult:
    """Question-ranking relevance of a set of answers (see the module docstring)."""

    top1: float  # share of answers whose own question ranks first
    mrr: float  # mean reciprocal rank of the own question
    copy_share: float  # share of answers with `question_containment` >= copy_threshold
    top1_without_copies: float | None  # top-1 over the answers that do not copy (None if all do)
    answers: int
    candidates: int  # questions each answer is ranked against, its own included
    ranks: list[float]  # expected rank of each answer's own question (1 = first)
    copies: list[bool]

    def as_dict(self) -> dict[str, float | int | None]:
        """The summary figures (no per-answer lists), for metrics.json."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("ranks", "copies")}


def _bigrams(text: str) -> set[str]:
    text = _NOT_TEXT.sub("", text)
    return {text[i:i + 2] for i in range(len(text) - 1)}


def question_containment(question: str, answer: str) -> float:
    """Share of the question's character bigrams (punctuation and spaces removed) found in the answer.

    1.0 when the answer contains the question's wording whole; a real answer reuses only the key terms
    (median 0.10 on the sample's references). 0.0 for a question shorter than two characters.
    """
    q = _bigrams(question)
    return len(q & _bigrams(answer)) / len(q) if q else 0.0


def question_key(question: str) -> str:
    """What tells two questions apart for relevance: letters and digits only (``头痛？`` and ``头痛`` are one)."""
    return _NOT_TEXT.sub("", question)


def can_rank(questions: Sequence[str]) -> bool:
    """Whether `relevance` can score these questions: at least two differ by `question_key`.

    The guard before calling `relevance`: comparing the raw strings would let ``["头痛？", "头痛"]`` through
    and `draw_candidates` would then refuse them.
    """
    keys: set[str] = set()
    for q in questions:
        keys.add(question_key(q))
        if len(keys) >= 2:
            return True
    return False


def draw_candidates(questions: Sequence[str], groups: Sequence[str | None] | None = None,
                    n_candidates: int = N_CANDIDATES, seed: int = 0) -> "np.ndarray":
    """Candidate question indices, one row per item: its own index first, then distractors.

    Distractors come from the item's group (sub-department) when it has enough other items, topped up
    from the other groups; never an item whose question has the same text. Fewer distinct questions
    than ``n_candidates`` give shorter rows (every item the same length). Seeded: same input, same draw.
    """
    import numpy as np

    n = len(questions)
    ids: dict[str, int] = {}
    keys = np.array([ids.setdefault(question_key(q), len(ids)) for q in questions], dtype=np.int64)
    k = min(n_candidates, len(ids))
    if k < 2:  # `can_rank` tells beforehand
        raise ValueError(f"relevance needs at least 2 different questions (punctuation ignored), got {len(ids)}")
    labels = np.asarray([g or "" for g in groups] if groups is not None else [""] * n, dtype=object)
    if len(labels) != n:
        raise ValueError(f"{n} questions but {len(labels)} groups")
    members = {g: np.flatnonzero(labels == g) for g in set(labels.tolist())}
    outsiders: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    out = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        g = labels[i]
        same = _draw(rng, members[g], k - 1, keys, keys[i])
        if len(same) < k - 1:
            if g not in outsiders:
                outsiders[g] = np.flatnonzero(labels != g)
            same = np.concatenate([same, _draw(rng, outsiders[g], k - 1 - len(same), keys, keys[i])])
        out[i, 0], out[i, 1:] = i, same
    return out


def _draw(rng: "np.random.Generator", pool: "np.ndarray", need: int, keys: "np.ndarray", own: int) -> "np.ndarray":
    """Up to ``need`` members of ``pool`` whose question key is not ``own``, without replacement."""
    take = min(len(pool), need + 4)
    while True:
        picked = pool[rng.choice(len(pool), take, replace=False)] if take else pool[:0]
        picked = picked[keys[picked] != own]
        if len(picked) >= need or take == len(pool):
            return picked[:need]
        take = min(len(pool), 2 * take)


def relevance(
    questions: Sequence[str],
    answers: Sequence[str],
    groups: Sequence[str | None] | None = None,
    *,
    references: Sequence[str] | None = None,
    n_candidates: int = N_CANDIDATES,
    seed: int = 0,
    copy_threshold: float = COPY_THRESHOLD,
) -> RelevanceResult:
    """Rank each answer's own question among ``n_candidates`` (see the module docstring).

    ``answers[i]`` answers ``questions[i]``; ``groups[i]`` is its sub-department (None: unknown). The
    TF-IDF vectoriser is fitted on the questions and ``references`` (the reference answers; the
    ``answers`` themselves when not given).
    """
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(answers) != len(questions) or (references is not None and len(references) != len(questions)):
        raise ValueError("questions, answers (and references) must have the same length")
    candidates = draw_candidates(questions, groups, n_candidates, seed)
    n, k = candidates.shape
    vectoriser = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True, dtype=np.float32)
    fitted = vectoriser.fit_transform(list(questions) + list(references if references is not None else answers))
    q = fitted[:n]  # rows L2-normalised
    a = fitted[n:] if references is None else vectoriser.transform(answers)
    sims = np.asarray(q[candidates.ravel()].multiply(a[np.repeat(np.arange(n), k)]).sum(axis=1)).reshape(n, k)
    own = sims[:, :1]
    above = (sims[:, 1:] > own).sum(axis=1)
    ties = (sims[:, 1:] == own).sum(axis=1)
    # Under a random order of the tied candidates the own question is equally likely at each of the
    # tied places: ranks above+1 ... above+1+ties.
    top1 = np.where(above == 0, 1.0 / (1 + ties), 0.0)
    rr = np.array([np.mean(1.0 / np.arange(b + 1, b + t + 2)) for b, t in zip(above, ties)])
    copies = np.array([question_containment(qq, aa) >= copy_threshold for qq, aa in zip(questions, answers)], dtype=bool)
    kept = ~copies
    return RelevanceResult(
        top1=float(top1.mean()), mrr=float(rr.mean()), copy_share=float(copies.mean()),
        top1_without_copies=float(top1[kept].mean()) if kept.any() else None,
        answers=n, candidates=k, ranks=(above + 1 + ties / 2).tolist(), copies=copies.tolist())

"""The department classifier's file: numpy arrays + JSON, no pickle; read back, it predicts the same."""
from __future__ import annotations

import numpy as np
import pytest

from medtune.data.classifier import CLASSIFIER_FILE, fit, load_classifier, predict_department, save_classifier
from medtune.errors import MedtuneError

QUESTIONS = ["高血压能吃党参吗", "血压高头晕怎么办", "胃胀气吃什么药", "胃疼反酸烧心", "咳嗽有痰发烧", "感冒咳嗽流鼻涕"] * 5
LABELS = ["心血管科", "心血管科", "消化科", "消化科", "呼吸科", "呼吸科"] * 5


def test_round_trip_predicts_the_same_without_pickle(tmp_path):
    clf = fit(QUESTIONS, LABELS, seed=0)
    path = tmp_path / CLASSIFIER_FILE
    save_classifier(clf, path)
    with np.load(path, allow_pickle=False) as npz:  # readable without unpickling anything
        assert "header" in npz.files and npz["classes"].dtype.kind == "U"
    back = load_classifier(path)
    probe = ["最近血压有点高", "吃完饭胃胀", "咳嗽好几天了", "头晕"]
    assert np.array_equal(back.model.predict_proba(probe), clf.model.predict_proba(probe))
    assert predict_department(back, probe) == predict_department(clf, probe)
    assert (back.level, back.labels, back.train_rows) == (clf.level, clf.labels, clf.train_rows)


def test_single_label_and_foreign_files(tmp_path):
    path = tmp_path / CLASSIFIER_FILE
    save_classifier(fit(QUESTIONS[:6], ["内科"] * 6), path)
    assert predict_department(load_classifier(path), ["头晕"]) == [("内科", 1.0)]
    pickled = tmp_path / "department_classifier.joblib"
    pickled.write_bytes(b"\x80\x04\x95pickle")
    with pytest.raises(MedtuneError, match="not a department classifier"):
        load_classifier(pickled)


def _reference_counts(texts: list[str], bits: int) -> dict[tuple[int, int], int]:
    """Character and character-pair counts per (row, hashed column), the plain way."""
    out: dict[tuple[int, int], int] = {}
    mask = (1 << 64) - 1
    for r, text in enumerate(texts):
        keys = [ord(c) for c in text] + [(ord(a) << 21 | ord(b)) | 1 << 63 for a, b in zip(text, text[1:])]
        for key in keys:
            col = ((key * 0x9E3779B97F4A7C15) & mask) >> (64 - bits)
            out[r, col] = out.get((r, col), 0) + 1
    return out


def test_char_ngram_features_are_the_counts_of_characters_and_pairs():
    import random

    from medtune.data.classifier import CharNgrams

    rnd = random.Random(0)
    alphabet = "高血压能吃党参吗头痛发热怎么办？，。 abc123\n" + "\U00020000\U0001F600é"
    texts = ["", "a", "高", "高高高", "ab" * 40] + ["".join(rnd.choices(alphabet, k=rnd.randrange(0, 60)))
                                                  for _ in range(500)]
    vec = CharNgrams(n_features=1 << 12)
    vec.CHUNK = 97  # several chunks, stacked
    m = vec.transform(texts).tocoo()
    got = {(int(r), int(c)): v for r, c, v in zip(m.row, m.col, m.data)}
    assert got == _reference_counts(texts, 12)
    csr = vec.transform(texts)
    assert csr.dtype == np.float32 and csr.has_sorted_indices and csr.shape == (len(texts), 1 << 12)

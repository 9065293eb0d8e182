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

"""Exam questions written for these tests (basic clinical facts), in CMMLU's and CMB's shapes."""
from __future__ import annotations

import csv
import json
from pathlib import Path

# subject -> [(question, options A-D, key)] : CMMLU-style, single answer, four options
CMMLU = {
    "clinical_knowledge": [
        ("成人正常静息心率的范围是", ["40~60次/分", "60~100次/分", "100~120次/分", "120~140次/分"], "B"),
        ("乙型肝炎病毒的传播途径不包括", ["血液传播", "母婴传播", "性接触传播", "粪-口传播"], "D"),
        ("急性心肌梗死最典型的心电图改变是", ["ST段抬高伴病理性Q波", "P波高尖", "U波明显", "PR间期缩短"], "A"),
        ("缺铁性贫血的典型血象表现为", ["大细胞性贫血", "正常细胞性贫血", "小细胞低色素性贫血", "巨幼细胞性贫血"], "C"),
    ],
    "anatomy": [
        ("人体最大的实质性器官是", ["肝脏", "脾", "肾", "胰腺"], "A"),
        ("胰岛素由胰岛的哪种细胞分泌", ["α细胞", "β细胞", "δ细胞", "PP细胞"], "B"),
    ],
}

# CMB-style records: single and multiple answers, four or five options
CMB = [
    {"exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "临床执业医师", "question_type": "单项选择题",
     "question": "幽门螺杆菌感染与下列哪种疾病关系最密切",
     "option": {"A": "胆囊炎", "B": "胰腺炎", "C": "阑尾炎", "D": "消化性溃疡", "E": "肠梗阻"}, "answer": "D"},
    {"exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "临床执业医师", "question_type": "单项选择题",
     "question": "诊断糖尿病的空腹血浆葡萄糖标准是",
     "option": {"A": "≥5.6 mmol/L", "B": "≥6.1 mmol/L", "C": "≥7.0 mmol/L", "D": "≥11.1 mmol/L"}, "answer": "C"},
    {"exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "临床执业医师", "question_type": "多项选择题",
     "question": "乙型肝炎的传播途径有",
     "option": {"A": "血液传播", "B": "母婴传播", "C": "性接触传播", "D": "呼吸道飞沫传播"}, "answer": "ABC"},
    {"exam_type": "护理考试", "exam_class": "护师", "exam_subject": "护理学", "question_type": "多项选择题",
     "question": "高血压患者的生活方式干预包括",
     "option": {"A": "限制钠盐摄入", "B": "戒烟限酒", "C": "大量饮用浓茶", "D": "规律运动", "E": "控制体重"},
     "answer": "ABDE"},
    {"exam_type": "护理考试", "exam_class": "护师", "exam_subject": "护理学", "question_type": "单项选择题",
     "question": "急性心肌梗死最常见的首发症状是",
     "option": {"A": "恶心呕吐", "B": "胸痛", "C": "发热", "D": "心律失常", "E": "心力衰竭"}, "answer": "B"},
]


def write_cmmlu(folder: Path) -> Path:
    """One CSV per subject with CMMLU's header ``,Question,A,B,C,D,Answer``."""
    folder.mkdir(parents=True, exist_ok=True)
    for subject, rows in CMMLU.items():
        with open(folder / f"{subject}.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
            for i, (q, options, key) in enumerate(rows):
                w.writerow([i, q, *options, key])
    return folder


def write_cmb(path: Path) -> Path:
    path.write_text(json.dumps(CMB, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def all_texts() -> list[str]:
    """Every question and option, and the prompts' instructions (to train a tokenizer on)."""
    from medtune.evaluate.exam import MULTI_PROMPT, SINGLE_PROMPT

    texts = [q for rows in CMMLU.values() for q, _, _ in rows] + [o for rows in CMMLU.values() for _, opts, _ in rows for o in opts]
    texts += [r["question"] for r in CMB] + [o for r in CMB for o in r["option"].values()]
    return texts + [SINGLE_PROMPT, MULTI_PROMPT]

"""Exam loading (CMMLU, CMB, generic mappings), answer parsing, and the scorer's arithmetic on a stub model
with known logits; on the tiny model, batching and a model trained on the key."""
from __future__ import annotations

import csv
import json
import math
import re
from types import SimpleNamespace

import pytest

from exam_fixtures import CMMLU, write_cmb, write_cmmlu
from medtune.errors import DataError, MedtuneError
from medtune.evaluate.exam import (LETTERS, ExamArgs, exam_prompt, letter_token_ids, load_exam, next_token_logprobs,
                                   parse_choices, parse_key, parse_options, score_by_likelihood, score_exam,
                                   summarize)


@pytest.fixture
def cmmlu_questions(tmp_path):
    return load_exam(ExamArgs(exam=write_cmmlu(tmp_path / "cmmlu"), exam_format="cmmlu"))


@pytest.fixture
def cmb_questions(tmp_path):
    return load_exam(ExamArgs(exam=write_cmb(tmp_path / "cmb.json"), exam_format="cmb"))


# ----------------------------------------------------------------------------- loading

def test_cmmlu_files_load_with_the_file_stem_as_subject(cmmlu_questions):
    assert len(cmmlu_questions) == sum(len(rows) for rows in CMMLU.values())
    by_subject = {q.subject for q in cmmlu_questions}
    assert by_subject == {"clinical_knowledge", "anatomy"}
    heart = next(q for q in cmmlu_questions if q.question.startswith("成人正常静息心率"))
    assert heart.options == {"A": "40~60次/分", "B": "60~100次/分", "C": "100~120次/分", "D": "120~140次/分"}
    assert heart.answer == "B" and not heart.multi
    assert heart.source.endswith("clinical_knowledge.csv:2")


def test_cmb_json_keeps_multi_answer_keys_and_categories(cmb_questions):
    assert [q.answer for q in cmb_questions] == ["D", "C", "ABC", "ABDE", "B"]
    assert [q.multi for q in cmb_questions] == [False, False, True, True, False]
    assert cmb_questions[0].subject == "临床执业医师" and cmb_questions[0].category == "医师考试"
    assert list(cmb_questions[3].options) == list("ABCDE")


def test_generic_mappings(tmp_path):
    # CMExam-like CSV: the options in one field as lines
    cmexam = tmp_path / "cmexam.csv"
    with open(cmexam, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Question", "Options", "Answer", "Department"])
        w.writerow(["新生儿生理性黄疸一般出现在出生后", "A 24小时内\nB 2~3天\nC 2周后\nD 1个月后", "B", "儿科"])
        w.writerow(["下列属于糖尿病急性并发症的是", "A 糖尿病酮症酸中毒\nB 糖尿病肾病\nC 高渗高血糖综合征\nD 视网膜病变",
                    "AC", "内分泌科"])
    got = load_exam(ExamArgs(exam=cmexam, exam_format="generic", exam_question_field="Question",
                             exam_options_field="Options", exam_answer_field="Answer", exam_category_field="Department"))
    assert [(q.answer, q.category, len(q.options)) for q in got] == [("B", "儿科", 4), ("AC", "内分泌科", 4)]
    assert got[0].options["B"] == "2~3天"
    # MedQA-like JSONL: one field per option, the key naming a field
    medqa = tmp_path / "medqa.jsonl"
    medqa.write_text(json.dumps({"q": "维生素K缺乏时凝血时间", "opa": "缩短", "opb": "延长", "opc": "不变", "ans": "opb",
                                 "subj": "血液学"}, ensure_ascii=False) + "\n", encoding="utf-8")
    [q] = load_exam(ExamArgs(exam=medqa, exam_format="generic", exam_question_field="q",
                             exam_options_fields="opa,opb,opc", exam_answer_field="ans", exam_subject_field="subj"))
    assert (q.options, q.answer, q.subject) == ({"A": "缩短", "B": "延长", "C": "不变"}, "B", "血液学")


def test_bad_exam_files_name_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(",Question,A,B,C,Answer\n0,问题,甲,乙,丙,A\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv:1: not a CMMLU file: no D column"):
        load_exam(ExamArgs(exam=bad))
    key = tmp_path / "key.csv"
    key.write_text(",Question,A,B,C,D,Answer\n0,问题一,甲,乙,丙,丁,A\n1,问题二,甲,乙,丙,丁,E\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"key.csv:3 \[Answer\]: no valid answer: 'E'"):
        load_exam(ExamArgs(exam=key))
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"question": "问题", "options": {"A": "甲", "B": "乙"}}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x.jsonl:1 \[answer\]: no 'answer' field"):
        load_exam(ExamArgs(exam=jsonl, exam_format="generic"))
    gap = tmp_path / "gap.jsonl"
    gap.write_text('{"question": "问题", "options": {"A": "甲", "C": "丙"}, "answer": "A"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="options A, C are not A, B, C"):
        load_exam(ExamArgs(exam=gap, exam_format="generic"))
    with pytest.raises(DataError, match="no .csv file"):
        load_exam(ExamArgs(exam=tmp_path / "empty_dir" if (tmp_path / "empty_dir").mkdir() is None else None))


def test_exam_csv_errors_name_the_line_a_record_starts_on_and_its_field(tmp_path):
    """Records whose quoted fields span lines: the error points at the record's first line, not its last."""
    header = ",Question,A,B,C,D,Answer\n"
    good = '0,"成人正常静息心率\n（多行题干）",40,"60\n~100",100,120,B\n'  # lines 2-4
    cases = {
        "key": (good + '1,"问题二\n第二行",甲,乙,丙,丁,E\n', r"key.csv:5 \[Answer\]: no valid answer: 'E'"),
        "question": (good + '1,"  ",甲,乙,丙,丁,A\n', r"question.csv:5 \[Question\]: empty question"),
        "options": (good + '1,"问题\n二",甲,,,,A\n', r"options.csv:5 \[A,B,C,D\]: fewer than two options"),
        "count": (good + "1,问题二,甲,乙\n", r"count.csv:5 \[C\]: 4 fields, expected 7"),
        "quote": (good + '1,"问题"二,甲,乙,丙,丁,A\n', r"quote.csv:5: broken CSV quoting"),
    }
    for name, (body, message) in cases.items():
        path = tmp_path / name / f"{name}.csv"
        path.parent.mkdir()
        path.write_text(header + body, encoding="utf-8")
        with pytest.raises(DataError, match=message) as err:
            load_exam(ExamArgs(exam=path))
        assert err.value.line == 5 and err.value.path == path
    ok = tmp_path / "ok.csv"
    ok.write_text(header + good + '\n1,"问题二\n第二行",甲,乙,丙,丁,C\n', encoding="utf-8")  # a blank line between
    first, second = load_exam(ExamArgs(exam=ok))
    assert first.source.endswith("ok.csv:2") and second.source.endswith("ok.csv:6")
    assert first.options["B"] == "60\n~100"
    generic = tmp_path / "generic.csv"
    generic.write_text('题目,选项,答案\n"第一题\n续",A 甲 B 乙,Z\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"generic.csv:2 \[答案\]: no valid answer: 'Z'"):
        load_exam(ExamArgs(exam=generic, exam_format="generic", exam_question_field="题目", exam_options_field="选项",
                           exam_answer_field="答案"))


def test_limit(tmp_path):
    assert len(load_exam(ExamArgs(exam=write_cmb(tmp_path / "c.json"), exam_format="cmb", exam_limit=2))) == 2


@pytest.mark.parametrize("value,key", [("B", "B"), ("ABD", "ABD"), ("a, c", "AC"), ("C、A", "AC"), (["A", "C"], "AC"),
                                       ("opc", "C"), ("F", ""), ("答案A", ""), ("", ""), ("DNA", "")])
def test_parse_key(value, key):
    assert parse_key(value, "ABCDE", ["opa", "opb", "opc", "opd", "ope"]) == key


def test_parse_options():
    assert parse_options("A. 甲状腺\nB. 肝脏\nC、脾脏\nD 肾") == {"A": "甲状腺", "B": "肝脏", "C": "脾脏", "D": "肾"}
    assert parse_options("A.甲 B.乙 C.丙") == {"A": "甲", "B": "乙", "C": "丙"}
    assert parse_options(["甲", "乙"]) == parse_options('{"A": "甲", "B": "乙"}') == {"A": "甲", "B": "乙"}
    assert parse_options("A Aspirin\nB Brufen") == {"A": "Aspirin", "B": "Brufen"}


@pytest.mark.parametrize("text,letters", [
    ("答案：A、C", "AC"), ("ABD。解析：B选项错误的原因是……", "ABD"), ("正确答案是B和D，因为A不对", "BD"),
    ("我认为应选C", "C"), ("根据题意，A正确", "A"), ("DNA检测阳性，故选B", "B"), ("（A）", "A"),
    ("答案：ABE", "AB"),  # E is not an option of a four-option question
    ("无法判断", ""),
])
def test_parse_choices(text, letters):
    assert parse_choices(text, "ABCD") == letters


# ----------------------------------------------------------------------------- letter tokens

class CharTokenizer:
    """Characters as tokens, except that ``merge`` preceding characters fuse with a capital letter."""

    def __init__(self, merge: int):
        self.pattern = re.compile("." * merge + "[A-H]|.", re.DOTALL) if merge else re.compile(".", re.DOTALL)
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(t, len(self.vocab)) for t in self.pattern.findall(text)]}


def test_letter_form_is_the_single_token_one(exam_tokenizer):
    prompt = "问题\n答案：<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    prefix, ids = letter_token_ids(exam_tokenizer, prompt, "ABCD")
    assert prefix == "" and [exam_tokenizer.decode([ids[c]]) for c in "ABCD"] == list("ABCD")
    # 'A' fuses with the prompt's last character; ' A' is one token of its own: that form is used
    prefix, ids = letter_token_ids(CharTokenizer(1), "答案：", "ABCD")
    assert prefix == " " and len(set(ids.values())) == 4
    with pytest.raises(MedtuneError, match="not single tokens"):
        letter_token_ids(CharTokenizer(2), "答案：", "ABCD")


# ----------------------------------------------------------------------------- the scorer on a stub model

class StubLM:
    """A causal LM whose next-token logits after each known prompt are fixed (0 for unlisted tokens).

    Earlier positions put a large logit on a decoy token, so a scorer that reads any position but the
    last real one, or mishandles left padding, gets visibly wrong numbers.
    """

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]], vocab_size: int, decoy: int):
        import torch

        self.table, self.vocab_size, self.decoy = table, vocab_size, decoy
        self.training = False
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def parameters(self):
        yield self.weight

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def forward(self, input_ids, attention_mask, position_ids):
        import torch

        self.calls += 1
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for b in range(input_ids.shape[0]):
            real = attention_mask[b].bool()
            assert not real[:-real.sum()].any()  # left padding
            assert position_ids[b][real].tolist() == list(range(int(real.sum())))
            for token, value in self.table[tuple(input_ids[b][real].tolist())].items():
                logits[b, -1, token] = value
            logits[b, :-1, self.decoy] = 100.0
        return SimpleNamespace(logits=logits)

    __call__ = forward


# question -> logits of the letters after its prompt (other tokens: 0), and what the scorer must predict
STUB_LOGITS = {
    "成人正常静息心率的范围是": ({"A": 1.0, "B": 3.0, "C": 0.0, "D": -2.0}, "B"),      # key B: right
    "乙型肝炎病毒的传播途径不包括": ({"A": 2.5, "D": 2.0}, "A"),                       # key D: wrong
    "急性心肌梗死最典型的心电图改变是": ({"A": 0.5, "E": 9.0}, "A"),                     # key A: right; E is no option
    "缺铁性贫血的典型血象表现为": ({"A": 1.0, "C": 0.2}, "A"),                         # key C: wrong
    "人体最大的实质性器官是": ({"A": 4.0}, "A"),                                      # key A: right
    "胰岛素由胰岛的哪种细胞分泌": ({"C": 1.5, "B": 1.4}, "C"),                           # key B: wrong
}


def _stub(tokenizer, questions):
    _, ids = letter_token_ids(tokenizer, exam_prompt(tokenizer, questions[0]), LETTERS)
    table = {tuple(tokenizer(exam_prompt(tokenizer, q), add_special_tokens=False)["input_ids"]):
             {ids[c]: v for c, v in STUB_LOGITS[q.question][0].items()} for q in questions}
    return StubLM(table, len(tokenizer), decoy=ids["D"]), ids


def test_likelihood_scorer_arithmetic_on_a_stub_model(exam_tokenizer, cmmlu_questions):
    model, ids = _stub(exam_tokenizer, cmmlu_questions)
    graded = score_by_likelihood(model, exam_tokenizer, cmmlu_questions, batch_size=4)
    assert model.calls == 2
    vocab = len(exam_tokenizer)
    for q, g in zip(cmmlu_questions, graded):
        letters, expected = STUB_LOGITS[q.question]
        # log-softmax over the whole vocabulary, by hand: every unlisted token has logit 0
        log_z = math.log(vocab - len(letters) + sum(math.exp(v) for v in letters.values()))
        want = {c: letters.get(c, 0.0) - log_z for c in "ABCD"}
        assert g.logprobs == pytest.approx(want, abs=1e-5)
        assert g.predicted == expected and g.correct == (expected == q.answer)
        assert g.letter_mass == pytest.approx(sum(math.exp(v) for v in want.values()), abs=1e-6)
    summary = summarize(graded)
    assert summary["single"]["accuracy"] == pytest.approx(3 / 6) and summary["single"]["n"] == 6
    assert summary["single"]["by_subject"] == {"anatomy": {"accuracy": 0.5, "n": 2},
                                               "clinical_knowledge": {"accuracy": 0.5, "n": 4}}
    assert "by_category" not in summary["single"] and "multi" not in summary
    # the same numbers one prompt at a time
    again = score_by_likelihood(model, exam_tokenizer, cmmlu_questions, batch_size=1)
    assert [g.logprobs for g in again] == [pytest.approx(g.logprobs, abs=1e-6) for g in graded]


def test_multi_answer_questions_are_scored_by_the_generated_letters(exam_tokenizer, cmb_questions, monkeypatch):
    replies = {"乙型肝炎的传播途径有": "答案：A、B、C", "高血压患者的生活方式干预包括": "ABD",
               "幽门螺杆菌感染与下列哪种疾病关系最密切": "答案是D", "诊断糖尿病的空腹血浆葡萄糖标准是": "B",
               "急性心肌梗死最常见的首发症状是": "选B。胸痛是最常见的首发症状"}
    prompts_seen = []

    def fake_generate(model, tokenizer, prompts, gen, *, stop_ids=None, streamer=None):
        assert gen.greedy and gen.max_new_tokens == 32
        prompts_seen.extend(prompts)
        out = []
        for p in prompts:
            question = next(q for q in replies if q in p)
            out.append((replies[question], 0, 0, "stop"))
        return out

    monkeypatch.setattr("medtune.infer.generate", fake_generate)
    single = [q for q in cmb_questions if not q.multi]
    stub_logits = {q.question: ({q.answer: 5.0}, q.answer) for q in single}  # likelihood gets every one right
    monkeypatch.setitem(globals(), "STUB_LOGITS", stub_logits)
    model, _ = _stub(exam_tokenizer, single)
    graded = score_exam(model, exam_tokenizer, cmb_questions, generate_single=True)
    assert [g.method for g in graded] == ["likelihood"] * 3 + ["generation"] * 5
    assert all(q.question in p for q, p in zip([q for q in cmb_questions if q.multi] + single, prompts_seen))
    assert "多项选择题" in prompts_seen[0] and "单项选择题" in prompts_seen[2]
    summary = summarize(graded)
    assert summary["single"]["accuracy"] == 1.0
    assert summary["multi"] == {"accuracy": 0.5, "n": 2,
                                "by_subject": {"临床执业医师": {"accuracy": 1.0, "n": 1}, "护理学": {"accuracy": 0.0, "n": 1}},
                                "by_category": {"医师考试": {"accuracy": 1.0, "n": 1}, "护理考试": {"accuracy": 0.0, "n": 1}}}
    assert summary["single_generated"]["accuracy"] == pytest.approx(2 / 3)
    multi = [g for g in graded if g.multi]
    assert [(g.answer, g.predicted) for g in multi] == [("ABC", "ABC"), ("ABDE", "ABD")]


def test_likelihood_scoring_refuses_multi_answer_questions(exam_tokenizer, cmb_questions):
    with pytest.raises(ValueError, match="single-answer"):
        score_by_likelihood(None, exam_tokenizer, cmb_questions)


# ----------------------------------------------------------------------------- the tiny Qwen3

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from medtune.modeling import load_base

    return load_base(tiny_model_dir)


def test_a_prompt_scores_the_same_alone_and_in_a_left_padded_batch(tiny, cmb_questions):
    model, tokenizer = tiny
    prompts = [exam_prompt(tokenizer, q) for q in cmb_questions]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 3  # different lengths: real padding
    _, ids = letter_token_ids(tokenizer, prompts[0], "ABCDE")
    together = next_token_logprobs(model, tokenizer, prompts, list(ids.values()), batch_size=len(prompts))
    alone = next_token_logprobs(model, tokenizer, prompts, list(ids.values()), batch_size=1)
    for a, b in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-4)


def _micro_qwen3(tokenizer):
    """A 2-layer, 64-wide Qwen3: the tiny model (4 x 256) needs hundreds of steps to tie each question to
    its letter (80 full fine-tuning steps only learned how often each letter is the key); this one takes ~50."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id)
    return Qwen3ForCausalLM(config).eval()


def _train_on_the_key(model, tokenizer, questions, steps: int = 60) -> None:
    import torch

    from medtune.chat_format import build_messages, encode
    from medtune.evaluate.exam import exam_text
    from medtune.train import Collator

    examples = [encode(tokenizer, build_messages(exam_text(q), q.answer)) for q in questions]
    batch = Collator(tokenizer.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.eval()


@pytest.mark.slow
def test_a_model_trained_on_the_key_beats_the_untrained_one(exam_tokenizer, cmmlu_questions, cmb_questions):
    from medtune.chat_format import build_messages
    from medtune.evaluate.exam import exam_text
    from medtune.evaluate.loss import answer_loss

    model = _micro_qwen3(exam_tokenizer)
    single = cmmlu_questions + [q for q in cmb_questions if not q.multi]
    keyed = [build_messages(exam_text(q), q.answer) for q in single]
    before = summarize(score_by_likelihood(model, exam_tokenizer, single))["single"]
    loss_before = answer_loss(model, exam_tokenizer, keyed).loss
    _train_on_the_key(model, exam_tokenizer, single)
    after = summarize(score_by_likelihood(model, exam_tokenizer, single))["single"]
    loss_after = answer_loss(model, exam_tokenizer, keyed).loss
    print(f"accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f}, letter mass {before['letter_mass']:.2f} -> "
          f"{after['letter_mass']:.2f}, answer loss {loss_before:.2f} -> {loss_after:.2f}")
    assert after["accuracy"] >= 0.8 and after["accuracy"] >= before["accuracy"] + 0.3
    assert after["letter_mass"] > 0.5 > before["letter_mass"]  # it now answers with a letter
    assert loss_after < loss_before / 2

"""Cleaning: normalisation, contact scrubbing, title/ask merging, learned boilerplate, lengths."""
from __future__ import annotations

import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from medtune.data.clean import (
    learn_boilerplate, lengths, merge_question, normalise_table, normalise_text, remove_boilerplate,
    scrub_contacts, split_sentences, strip_boilerplate,
)
from medtune.data.load import load

INVENTED = "本回答由青柠健康小组审核发布，仅供参考"


def norm(*texts: str) -> list[str]:
    return normalise_text(pa.array(list(texts))).to_pylist()


@pytest.mark.parametrize("raw, clean", [
    ("ＡＢＣ１２３％　测试", "ABC123% 测试"),                  # full-width letters/digits/space → ASCII
    ("你好,我头痛!怎么办?", "你好，我头痛！怎么办？"),         # ASCII marks next to Chinese → Chinese marks
    ("卫生.避免细菌", "卫生。避免细菌"),                       # a full stop between Chinese characters
    ("血糖6.1mmol/L,偏高", "血糖6.1mmol/L，偏高"),              # decimals and units keep theirs
    ("第7,8,9月份", "第7,8,9月份"),
    ("3:00吃药", "3:00吃药"),
    ("好的。。谢谢，，再见！！！", "好的。谢谢，再见！"),      # repeated marks collapse
    ("注意饮食，。多休息", "注意饮食。多休息"),                 # a full stop absorbs a comma
    ("  ，开头 ", "开头"),                                     # leading marks and outer spaces go
    ("第一行\r\n\r\n  第二行\t\t结束", "第一行\n第二行 结束"),  # line breaks kept, spaces collapsed
    ("头痛 ， 发热", "头痛，发热"),
    ("零\u200b宽\x07字符", "零宽字符"),
])
def test_normalise(raw, clean):
    assert norm(raw) == [clean]


@pytest.mark.parametrize("raw, clean", [
    ("电话：13812345678，微信：abc_12345", "电话：[电话]，[微信号]"),
    ("打0551-62345678或400-123-4567", "打[电话]或[电话]"),
    ("访问www.example.com/a?b=1或http://x.cn/y 查看", "访问[网址]或[网址] 查看"),
    ("加QQ号：123456789，邮箱a.b@qq.com", "加[QQ号]，邮箱[邮箱]"),
    ("空腹血糖7.8mmol/L，HBV-DNA 2000000拷贝，身高170", "空腹血糖7.8mmol/L，HBV-DNA 2000000拷贝，身高170"),
])
def test_scrub_contacts_replaces_not_drops(raw, clean):
    assert scrub_contacts(pa.array([raw])).to_pylist() == [clean]


def test_scrub_contacts_on_candidate_rows_copies_only_when_one_changes():
    arr = pa.array(["电话13812345678", "身高170cm", "血压140/90", "加微信abc_12345咨询"])
    candidates = np.array([True, True, True, True])
    assert scrub_contacts(arr, candidates).to_pylist() == ["电话[电话]", "身高170cm", "血压140/90", "加[微信号]咨询"]
    untouched = pa.array(["身高170cm", "血压140/90", "化验单123"])
    assert scrub_contacts(untouched, np.array([True, False, True])) is untouched  # nothing to replace: no copy
    # rows left out of the candidates are not searched
    assert scrub_contacts(arr, np.array([False, True, True, False])) is arr


def test_merge_question_skips_a_title_the_ask_repeats():
    title = pa.array(["高血压能吃党参吗？", "胃反流", "头痛！", "", "失眠", "头痛"])
    ask = pa.array(["我有高血压，高血压能吃党参吗", "烧心，打嗝", "经常失眠", "只有问题", "", "经常头痛"])
    assert merge_question(title, ask).to_pylist() == [
        "我有高血压，高血压能吃党参吗", "胃反流\n烧心，打嗝", "头痛！经常失眠", "只有问题", "失眠", "经常头痛"]


def test_normalise_table_adds_question_and_answer(sample_csv):
    raw = load(sample_csv).table.slice(0, 500)
    t = normalise_table(raw)
    assert t.num_rows == 500 and {"question", "clean_answer"} <= set(t.column_names)
    ascii_mark_by_chinese = re.compile(r"[\u4e00-\u9fff][,?!;:]|[,?!;:][\u4e00-\u9fff]")
    assert any(ascii_mark_by_chinese.search(a) for a in raw["answer"].to_pylist())
    assert not any(ascii_mark_by_chinese.search(a) for a in t["clean_answer"].to_pylist())


# ----------------------------------------------------------------------------- boilerplate

@pytest.fixture(scope="module")
def answers(sample_csv) -> pa.Array:
    return normalise_table(load(sample_csv).table)["clean_answer"].combine_chunks()


def test_learns_the_samples_boilerplate(answers):
    learned = {e["sentence"]: e for e in learn_boilerplate(answers)}
    for known in ("祝患者身体早日恢复健康", "以上可以做为参考", "期望上述的答案可以协助到您，谢谢"):
        assert known in learned and learned[known]["share"] >= 0.003
    assert all(e["count"] >= 10 for e in learned.values())


def test_an_invented_sentence_in_many_answers_is_learned_and_removed(answers):
    rng = random.Random(0)
    texts = answers.to_pylist()
    hit = set(rng.sample(range(len(texts)), 120))  # 1.6% of the answers, at the end or in the middle
    base = {}
    for i in hit:
        parts = split_sentences(texts[i])
        where = rng.randrange(len(parts) + 1)
        if where == len(parts) and not parts[-1].endswith(("。", "！", "？")):
            parts[-1] += "。"  # appended after an unfinished sentence it would not be a sentence of its own
        base[i] = "".join(parts)
        parts.insert(where, INVENTED + "。")
        texts[i] = "".join(parts)
    learned = learn_boilerplate(pa.array(texts))
    assert INVENTED in [e["sentence"] for e in learned]
    cleaned, removed = strip_boilerplate(pa.array(texts), [e["sentence"] for e in learned])
    assert removed[INVENTED] == 120
    assert not any(INVENTED in a for a in cleaned.to_pylist())
    # Nothing else is lost from those answers: what remains is the answer minus learned sentences.
    for i in hit:
        assert cleaned[i].as_py() == remove_boilerplate(base[i], [e["sentence"] for e in learned])


def test_share_not_count_decides(answers):
    texts = answers.to_pylist()
    n = len(set(texts))
    rare = int(0.002 * n)  # 0.2% of answers: more than min_count, less than the 0.3% share
    texts = [t + "这句话只是偶尔出现。" if i < rare else t for i, t in enumerate(texts)]
    assert rare >= 10
    assert "这句话只是偶尔出现" not in [e["sentence"] for e in learn_boilerplate(pa.array(texts))]
    assert "这句话只是偶尔出现" in [e["sentence"] for e in learn_boilerplate(pa.array(texts), min_share=0.001)]


def test_a_tiny_input_does_not_flag_every_repeat():
    texts = [f"第{i}个回答的内容。多喝水。" for i in range(40)] + ["祝健康。"] * 3
    learned = [e["sentence"] for e in learn_boilerplate(pa.array(texts))]
    # 多喝水 is in 40 answers (>= min_count 10); the three copies of 祝健康 are one distinct answer. Without
    # the minimum count every sentence in two answers would pass the 0.3% share of 43 answers.
    assert learned == ["多喝水"]


def test_python_twin_matches_the_vectorised_removal(answers):
    phrases = [e["sentence"] for e in learn_boilerplate(answers)]
    arrow, _ = strip_boilerplate(answers, phrases)
    assert arrow.to_pylist() == [remove_boilerplate(a, phrases) for a in answers.to_pylist()]
    assert pc.sum(pc.not_equal(arrow, answers)).as_py() > 500


def test_remove_boilerplate_on_a_generated_answer():
    phrases = ["祝患者身体早日恢复健康！", "以上可以做为参考"]
    text = "高血压患者可以适量吃党参。以上可以做为参考。祝患者身体早日恢复健康"
    assert remove_boilerplate(text, phrases) == "高血压患者可以适量吃党参。"
    assert remove_boilerplate("以上可以做为参考价值不大。", phrases) == "以上可以做为参考价值不大。"  # whole sentences only


# ----------------------------------------------------------------------------- lengths

def test_lengths_in_characters_or_tokens():
    arr = pa.array(["高血压", "", "abc def"])
    assert lengths(arr).tolist() == [3, 0, 7]
    assert lengths(arr, lambda batch: [len(s.split()) for s in batch], batch_size=2).tolist() == [1, 0, 2]


def _reference_counts(texts: list[str], min_chars: int = 2) -> dict[str, int]:
    """Per sentence key, the distinct texts holding it (the Python rules of `medtune.sentences`)."""
    from collections import Counter

    from medtune.sentences import _key

    counts: Counter = Counter()
    for text in set(texts):
        counts.update({k for k in (_key(s) for s in split_sentences(text)) if len(k) >= min_chars})
    return dict(counts)


def test_compiled_sentence_counts_match_the_python_rules(answers):
    from medtune.data.clean import sentence_counts

    tricky = ["多喝水。。多休息！！祝早日康复…", "  多喝水。 (多休息) ", "多喝水!多休息?", "a。b。c", "。。。",
              "😀表情😀。多喝水", "“多喝水”。多休息；多休息;", "", "多喝水\n\n多休息\n", "多 喝 水 。"]
    texts = answers.to_pylist()[:3000] + tricky
    table, distinct = sentence_counts(pa.array(texts))
    table.validate(full=True)  # the keys' string array, assembled from byte offsets, is valid UTF-8
    assert distinct == len(set(texts))
    assert dict(zip(table["key"].to_pylist(), table["answers"].to_pylist())) == _reference_counts(texts)
    # copies marked by their ids count once; min_answers keeps only frequent keys
    ids = pa.array([0, 0, 1], pa.uint64())
    table, distinct = sentence_counts(pa.array(["多喝水。", "多喝水。", "多喝水。少熬夜"]), ids, min_answers=2)
    assert distinct == 2 and table.to_pylist() == [{"key": "多喝水", "answers": 2}]


def test_compiled_strip_matches_the_python_twin_on_tricky_texts():
    phrases = ["多喝水", "祝早日康复", "多休息"]
    texts = ["多喝水。。多休息！！祝早日康复…", "  多喝水。 (多休息) ", "看医生。多喝水!多休息?好", "😀表情😀。多喝水",
             "“多喝水”。多休息；多休息;", "", "多喝水\n\n多休息\n注意", None, "多喝水啊。"]
    out, removed = strip_boilerplate(pa.array(texts), phrases)
    assert out.to_pylist() == [None if t is None else remove_boilerplate(t, phrases) if any(
        k in t for k in phrases) else t for t in texts]
    assert removed == {"多喝水": 6, "多休息": 6, "祝早日康复": 1}


TRICKY = [
    "好,好,好.好.好", "a , 好", "好 ,a", "你好 , 我", ",好", "好,", "好 ?", "？？？！！！。。，，",
    "，。、；：好", "注意饮食，，。。多休息", "  \t\n 开头", "第一行\r\n\r\n  \t第二行\r结束  ", "头痛 （发热） 咳嗽",
    "“引号” 《书名》 【标记】", "ＡＢＣ１２３％　ｘ", "零\u200b宽\u200d\ufeff字\x07符\x0b\x0c", "6.1mmol/L。血糖.", "好.",
    "𠀀字.𠀁", "emoji😀,好", "网址 www.example.com ,电话 13812345678 .", "", "，", "\n\n", "！！好！！！", "：；好：；，",
    "\u1680，好\u2028", "\x85好\x1c", " \u3000好\u00a0 ",
    # marks that only meet once a space or a deleted character between them is gone
    "好， 。好", "好 ！ ！", "好？\u200b？", "好，\u200b，好", "好。 ，", "好。\t。", "好！？！？", "好；好：好、好",
    "多喝水。多休息！注意？好", "好!!", "好！!", "好？?", "，好", "。好", "好\u3000。",
]
CONTACTS = ["加微信abc12345", "WeChat: zhang_san1", "VX123456", "v信 hello12", "薇信号 abcdef7", "QQ：12345678",
            "扣扣 1234567", "企鹅号 88888", "电话 010-12345678", "打13812345678", "400-123-4567", "邮件 a.b@c.com",
            "HTTP://x.cn/a?b=1", "www.haodf.com", "见 Example.COM 页", "见 xx.top", "编号 12-345", "体温37.5度",
            "维生素B12", "查CT", "mg/dL", "qq", "[电话]", "数字 123 4567"]


def test_compiled_normalisation_matches_the_regex_rules_on_random_texts():
    """Texts drawn from the characters the rules are about (marks, spaces, Han, full-width and deleted
    characters), so that every rule and their interplay is hit many times."""
    from medtune.data.clean import normalise_text_reference

    rng = random.Random(7)
    alphabet = list("好病a1 ,.!?;:，。！？；：、…（）\t\n\r\u3000\u200bＡ１？！ 。") + ["\u00a0", "\x0b", "𠀀"]
    texts = pa.array(["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(20_000)])
    assert normalise_text(texts).to_pylist() == normalise_text_reference(texts).to_pylist()


def test_compiled_normalisation_matches_the_regex_rules(sample_csv):
    from medtune.data.clean import normalise_text_reference

    table = load(sample_csv).table
    for col in ("title", "ask", "answer"):
        texts = pa.concat_arrays([table[col].combine_chunks(), pa.array(TRICKY)])
        assert normalise_text(texts).to_pylist() == normalise_text_reference(texts).to_pylist()
    texts = pa.concat_arrays([normalise_text(table["answer"]), normalise_text(pa.array(CONTACTS + TRICKY))])
    from medtune.data.clean import normalise_flagged

    _, flags = normalise_flagged(pa.concat_arrays([table["answer"].combine_chunks(), pa.array(CONTACTS + TRICKY)]))
    from medtune.data.kernels import MAY_HOLD_CONTACT

    candidates = (flags & MAY_HOLD_CONTACT) != 0
    # the flag is a superset of the rows the scrubbing changes: scrubbing only those gives the same texts
    assert scrub_contacts(texts, candidates).to_pylist() == scrub_contacts(texts).to_pylist()
    assert pc.sum(pc.not_equal(scrub_contacts(texts), texts)).as_py() >= 17
    assert candidates.mean() < 0.5                              # and it leaves most rows alone
    with_nulls = pa.array(["好 , 好", None, "a"])
    assert normalise_text(with_nulls).to_pylist() == ["好，好", None, "a"]


def test_compiled_title_merge_matches_the_reference(sample_csv):
    from medtune.data.clean import merge_question_reference

    table = load(sample_csv).table
    titles = pa.concat_arrays([normalise_text(table["title"]), pa.array(["", "？", "头痛。", "头痛", "头 痛", "头痛"])])
    asks = pa.concat_arrays([normalise_text(table["ask"]), pa.array(["头痛", "头痛", "发热", "", "头痛吗", "我头，痛"])])
    merged = merge_question(titles, asks).to_pylist()
    assert merged == merge_question_reference(titles, asks).to_pylist()
    assert merged[-6:] == ["头痛", "头痛", "头痛。发热", "头痛", "头痛吗", "我头，痛"]

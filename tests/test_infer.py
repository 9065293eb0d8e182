"""The inference function: chat-format prompt, generation that stops at <|im_end|>, the model's text alone."""
from __future__ import annotations

from pathlib import Path

import pytest

from medtune.chat_format import NOTICE_MARK, build_messages, compose_reply, render_prompt
from medtune.infer import Answer, GenerationArgs, Query, generate, generation_config, respond, stop_token_ids

GREEDY = GenerationArgs(greedy=True, max_new_tokens=12, repetition_penalty=1.0)
QUESTIONS = ["头晕怎么办？", "高血压患者平时饮食要注意什么？能吃党参吗？我今年六十岁了。", "胃胀气"]


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path):
    from medtune.modeling import load_base

    return load_base(tiny_model_dir)


def _by_hand(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Plain transformers greedy decoding of one prompt, cut at <|im_end|>."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return tokenizer.decode(new[:new.index(im_end)] if im_end in new else new, skip_special_tokens=True).strip()


def test_answer_is_the_chat_formatted_generation_alone(base):
    model, tokenizer = base
    [answer] = respond(model, tokenizer, [Query(QUESTIONS[0], department="神经科")], GREEDY)
    prompt = render_prompt(tokenizer, build_messages(QUESTIONS[0], department="神经科"))
    assert answer.answer == _by_hand(model, tokenizer, prompt, GREEDY.max_new_tokens)
    assert answer.notice is None and answer.disclaimer is None and not answer.emergency
    assert answer.department == "神经科" and answer.department_source == "given"
    assert answer.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert answer.text == answer.answer  # nothing added yet


def test_batched_left_padded_equals_one_at_a_time(base):
    model, tokenizer = base
    together = respond(model, tokenizer, QUESTIONS, GREEDY)
    alone = [respond(model, tokenizer, [q], GREEDY)[0] for q in QUESTIONS]
    assert [a.answer for a in together] == [a.answer for a in alone]
    assert [a.prompt_tokens for a in together] == [a.prompt_tokens for a in alone]


def _script(monkeypatch, model, tail: list[int]) -> None:
    """Make ``model.generate`` continue every prompt with ``tail``."""
    import torch

    def fake_generate(input_ids, attention_mask=None, **kwargs):
        return torch.cat([input_ids, torch.tensor([tail] * input_ids.shape[0])], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)


def test_generation_stops_at_im_end_and_strips_think(base, monkeypatch):
    model, tokenizer = base
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    scripted = tokenizer("<think>\n想一想\n</think>\n\n多喝水。", add_special_tokens=False)["input_ids"]
    _script(monkeypatch, model, scripted + [im_end] + scripted)
    [(text, _, n_out, reason)] = generate(model, tokenizer, ["x"], GREEDY)
    assert (text, n_out, reason) == ("多喝水。", len(scripted) + 1, "stop")


def test_answer_cut_by_max_new_tokens_is_reported(base, monkeypatch):
    model, tokenizer = base
    scripted = tokenizer("多喝水，注意", add_special_tokens=False)["input_ids"]
    _script(monkeypatch, model, scripted)
    [answer] = respond(model, tokenizer, ["头晕"], GREEDY)
    assert (answer.answer, answer.completion_tokens, answer.finish_reason) == ("多喝水，注意", len(scripted), "length")


def test_history_is_rendered_without_what_we_added(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    shown = compose_reply("注意休息。", notice=NOTICE_MARK + "请立即拨打120。", disclaimer="仅供参考。")
    q = Query("还是很晕", history=[{"role": "user", "content": "头晕"}, {"role": "assistant", "content": shown}])
    prompt = render_prompt(tokenizer, q.messages())
    assert "<|im_start|>assistant\n注意休息。<|im_end|>" in prompt
    assert NOTICE_MARK not in prompt and "仅供参考" not in prompt


def test_query_from_openai_messages():
    q = Query.from_messages([{"role": "system", "content": "你是医生"}, {"role": "user", "content": "Q1"},
                             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}])
    assert (q.question, q.system, len(q.history)) == ("Q2", "你是医生", 2)
    with pytest.raises(ValueError, match="last message"):
        Query.from_messages([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])


def test_sampling_defaults_are_qwen3_non_thinking(base):
    model, tokenizer = base
    gen = GenerationArgs()
    config = generation_config(tokenizer, gen, stop_token_ids(tokenizer))
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 0.7, 0.8, 20)
    assert config.repetition_penalty > 1.0
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in config.eos_token_id
    assert generation_config(tokenizer, GREEDY, [1]).do_sample is False
    with pytest.raises(ValueError, match="temperature"):
        GenerationArgs(temperature=0)


def test_seeded_sampling_is_reproducible(base):
    model, tokenizer = base
    gen = GenerationArgs(max_new_tokens=8, seed=7)
    assert respond(model, tokenizer, ["头晕"], gen)[0].answer == respond(model, tokenizer, ["头晕"], gen)[0].answer


def test_seed_prompt_format_stops_at_eos(base):
    model, tokenizer = base
    assert stop_token_ids(tokenizer, "seed") == [tokenizer.eos_token_id]
    [answer] = respond(model, tokenizer, ["头晕"], GREEDY, prompt_format="seed")
    assert isinstance(answer, Answer) and answer.prompt_tokens > 0


# ----------------------------------------------------------------------------- streaming = non-streaming

def _script_streaming(monkeypatch, model, tail: list[int]) -> None:
    """Like `_script`, feeding ``tail`` to the streamer one token at a time, as generate() does."""
    import torch

    def fake_generate(input_ids, attention_mask=None, streamer=None, **kwargs):
        if streamer is not None:
            streamer.put(input_ids)
            for t in tail:
                streamer.put(torch.tensor([t]))
            streamer.end()
        return torch.cat([input_ids, torch.tensor([tail] * input_ids.shape[0])], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)


BOILERPLATE = ["祝您早日康复", "以上是我的建议"]
SCRIPTED = [
    "多喝水。祝您早日康复！注意休息。",
    "<think>\n先想想\n</think>\n\n血压高要少盐。以上是我的建议。",
    "第一，低盐饮食；第二，规律服药！！\n\n第三，复查。祝您早日康复。",
    "Hello world. 高血压？是的。",
    "祝您早日康复！",
    "没有句号的回答",
]


@pytest.mark.parametrize("scripted", SCRIPTED)
def test_streamed_pieces_equal_the_non_streamed_answer(base, monkeypatch, scripted):
    model, tokenizer = base
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer(scripted, add_special_tokens=False)["input_ids"] + [im_end]
    _script_streaming(monkeypatch, model, ids)
    [plain] = respond(model, tokenizer, ["头晕"], GREEDY, boilerplate=BOILERPLATE)
    pieces: list[str] = []
    [streamed] = respond(model, tokenizer, ["头晕"], GREEDY, boilerplate=BOILERPLATE, stream=pieces.append)
    assert "".join(pieces) == streamed.answer == plain.answer
    assert "祝您早日康复" not in plain.answer and "<think>" not in plain.answer
    # released sentence by sentence, never a sentence cut in the middle (except the unfinished last one)
    from medtune.data.clean import SENTENCE_ENDS

    assert all(p[-1] in SENTENCE_ENDS for p in pieces[:-1]), pieces


@pytest.mark.slow
def test_streaming_real_generation_equals_non_streaming(base):
    model, tokenizer = base
    for gen in (GenerationArgs(greedy=True, max_new_tokens=40), GenerationArgs(max_new_tokens=40, seed=3)):
        [plain] = respond(model, tokenizer, [Query(QUESTIONS[1], department="心血管科")], gen, boilerplate=BOILERPLATE)
        pieces: list[str] = []
        [streamed] = respond(model, tokenizer, [Query(QUESTIONS[1], department="心血管科")], gen,
                             boilerplate=BOILERPLATE, stream=pieces.append)
        assert "".join(pieces) == streamed.answer == plain.answer
        assert streamed.completion_tokens == plain.completion_tokens
    with pytest.raises(ValueError, match="one query"):
        respond(model, tokenizer, QUESTIONS, GREEDY, stream=print)


def test_min_p_reaches_the_generation_config(base):
    model, tokenizer = base
    assert generation_config(tokenizer, GenerationArgs(), [1]).min_p is None  # Qwen3: 0, i.e. off
    assert generation_config(tokenizer, GenerationArgs(min_p=0.05), [1]).min_p == 0.05
    with pytest.raises(ValueError, match="min_p"):
        GenerationArgs(min_p=2)


def test_stop_ends_the_answer_after_the_token_it_says_so(base):
    """`stop` is asked after every token (Ctrl-C in `medtune chat` sets it): the answer ends there."""
    model, tokenizer = base
    gen = GenerationArgs(greedy=True, max_new_tokens=30, repetition_penalty=1.0)
    query = Query(QUESTIONS[1], department="心血管科")
    [full] = respond(model, tokenizer, [query], gen)
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) >= 5

    [cut] = respond(model, tokenizer, [query], gen, stream=lambda piece: None, stop=stop)
    assert full.completion_tokens > 5, "the tiny model should not end its answer this early"
    assert cut.completion_tokens == 5 and cut.finish_reason == "length"
    prompt = render_prompt(tokenizer, build_messages(QUESTIONS[1], department="心血管科"))
    assert cut.answer == _by_hand(model, tokenizer, prompt, 5)  # the first five tokens of the same answer
    [never] = respond(model, tokenizer, [query], gen, stop=lambda: False)
    assert never.answer == full.answer

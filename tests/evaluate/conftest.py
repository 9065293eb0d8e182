from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def exam_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A small byte-level BPE tokenizer with Qwen3's chat template, trained on the exam fixtures' prompts (< 1 s)."""
    from transformers import AutoTokenizer

    from exam_fixtures import all_texts
    from medtune.chat_format import system_prompt
    from medtune.modeling import save_tokenizer, train_tokenizer

    out: Path = tmp_path_factory.mktemp("exam-tokenizer")
    save_tokenizer(train_tokenizer((all_texts() + [system_prompt()]) * 3, vocab_size=600), out)
    return AutoTokenizer.from_pretrained(str(out))

"""Model cards: written by training, merging and exporting; evaluation figures added by `medtune eval`."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medtune.modelcard import (
    DISCLAIMER_EN, DISCLAIMER_ZH, EVALUATIONS, INTENDED_USE_EN, INTENDED_USE_ZH, figures, record_evaluations,
    render_card, write_model_card,
)


@pytest.fixture
def adapter_copy(trained_adapter_dir: Path, tmp_path: Path) -> Path:
    """The trained adapter without evaluations (another test's `medtune eval` may have added some)."""
    target = tmp_path / "my-adapter"
    shutil.copytree(trained_adapter_dir, target)
    (target / EVALUATIONS).unlink(missing_ok=True)
    write_model_card(target)
    return target


def _metrics(adapter: str, bleu: float, loss: float, output: str = "runs/eval") -> dict:
    """The parts of `medtune eval`'s metrics.json the card reads (same layout)."""
    def system(b: float, l: float) -> dict:
        return {"prompt_format": "qwen3-chat", "bleu-4": b, "rouge-1": 30.0, "rouge-2": 10.0, "rouge-l": 25.5,
                "corpus_bleu": 3.0, "relevance": {"top1": 0.45, "mrr": 0.6, "copy_share": 0.0},
                "length": {"mean_chars": 80.0}, "department_consistency": 0.7,
                "loss": {"loss": l, "perplexity": 2.718281828 ** l, "answer_tokens": 100, "examples": 6, "dropped": 0},
                "exam": {"single": {"accuracy": 0.5, "n": 4}}}
    return {"model": "tiny", "adapters": {adapter: "x"},
            "data": {"path": "runs/data", "split": "test", "examples": 6, "manifest_sha256": "ab" * 32},
            "exam": {"path": "cmb.json", "format": "cmb", "questions": 4, "multi_answer": 0},
            "warnings": [], "systems": {"base": system(1.0, 9.0), adapter: system(bleu, loss), "reference": {}}}


def test_training_writes_the_card(trained_adapter_dir: Path, adapter_copy: Path):
    card = (trained_adapter_dir / "README.md").read_text(encoding="utf-8")
    assert "More Information Needed" not in card  # peft's empty template is replaced
    card = (adapter_copy / "README.md").read_text(encoding="utf-8")
    manifest = json.loads((adapter_copy / "medtune.json").read_text(encoding="utf-8"))
    data = json.loads((adapter_copy / "data_manifest.json").read_text(encoding="utf-8"))
    assert card.startswith("---\n") and f"base_model: {json.dumps(manifest['base_model'])}" in card
    assert "library_name: peft" in card and "LoRA adapter (peft)" in card
    assert f"r={manifest['lora']['lora_r']}, alpha={manifest['lora']['lora_alpha']}" in card
    # data: name, counts, hashes
    assert data["files"][0]["name"] in card and data["files"][0]["sha256"] in card
    assert f"{data['counts']['kept']:,} kept" in card and manifest["data"]["manifest_sha256"] in card
    assert f"Training examples: {manifest['data']['examples']:,}" in card
    # the exact training options, evaluation not run yet, use, intended use, disclaimer (both languages)
    assert "```yaml" in card and "max_steps: 3" in card and "lora_r: 16" in card
    assert "Not evaluated yet" in card and f"medtune eval --adapter {adapter_copy}" in card
    assert f"medtune merge --adapter {adapter_copy}" in card
    for text in (DISCLAIMER_ZH, DISCLAIMER_EN, INTENDED_USE_ZH, INTENDED_USE_EN):
        assert text in card


def test_evaluation_figures_are_added_and_replaced(adapter_copy: Path, tmp_path: Path):
    name = "my_adapter"
    done = record_evaluations(_metrics(name, 12.3456, 2.5), {name: adapter_copy}, tmp_path / "base", Path("runs/eval"))
    assert done == [adapter_copy]
    card = (adapter_copy / "README.md").read_text(encoding="utf-8")
    assert "Not evaluated yet" not in card
    assert "| | BLEU-4 | ROUGE-L | relevance top-1 | department consistency | answer loss | perplexity | exam accuracy |" in card
    assert "| this model | 12.35 | 25.5 | 0.45 | 0.7 | 2.5 | 12.18 | 0.5 |" in card
    assert "| base model | 1 | 25.5 | 0.45 | 0.7 | 9 | 8103 | 0.5 |" in card
    assert "runs/data (test split, 6 examples)" in card and "exam cmb.json (4 questions)" in card
    # the same evaluation output again replaces its entry; another output adds one
    record_evaluations(_metrics(name, 20.0, 2.0), {name: adapter_copy}, tmp_path / "base", Path("runs/eval"))
    record_evaluations(_metrics(name, 30.0, 1.0), {name: adapter_copy}, tmp_path / "base", Path("runs/eval2"))
    entries = json.loads((adapter_copy / EVALUATIONS).read_text(encoding="utf-8"))
    assert [(e["output"], e["figures"]["bleu-4"]) for e in entries] == [("runs/eval", 20.0), ("runs/eval2", 30.0)]
    card = (adapter_copy / "README.md").read_text(encoding="utf-8")
    assert "12.35" not in card and "| this model | 20 |" in card and "| this model | 30 |" in card


def test_a_merged_model_evaluated_alone_gets_the_figures(adapter_copy: Path, tmp_path: Path):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "medtune.json").write_text(json.dumps({"kind": "merged", "base_model": "Qwen/Qwen3-4B"}), encoding="utf-8")
    metrics = _metrics("unused", 5.0, 3.0)
    assert record_evaluations(metrics, {}, merged, tmp_path / "eval") == [merged]
    [entry] = json.loads((merged / EVALUATIONS).read_text(encoding="utf-8"))
    assert entry["system"] == "base" and entry["base_figures"] is None and entry["figures"]["bleu-4"] == 1.0
    assert "library_name: transformers" in (merged / "README.md").read_text(encoding="utf-8")
    # a hub base model without medtune.json is not written to
    plain = tmp_path / "plain"
    plain.mkdir()
    assert record_evaluations(metrics, {}, plain, tmp_path / "eval") == [] and not (plain / "README.md").exists()
    # nor is an adapter medtune did not train (e.g. one downloaded with its publisher's card)
    assert record_evaluations(_metrics("theirs", 5.0, 3.0), {"theirs": plain}, merged, tmp_path / "eval") == []
    assert not (plain / EVALUATIONS).exists()


def test_figures_leave_out_what_was_not_measured():
    assert figures({"bleu-4": 3.0, "length": {}}) == {"bleu-4": 3.0}
    assert figures({"exam": {"multi": {"accuracy": 0.25, "n": 4}}}) == {"exam_accuracy": 0.25}
    assert figures({"loss": {"loss": None, "perplexity": None}, "relevance": {"top1": None}}) == {}  # NaN in metrics.json
    assert figures({}) == {}


def test_card_of_an_unknown_directory_still_carries_the_disclaimer(tmp_path: Path):
    card = render_card(tmp_path)
    assert DISCLAIMER_ZH in card and DISCLAIMER_EN in card and "Not recorded." in card


def test_modelcard_imports_without_torch():
    code = "import sys, medtune.modelcard; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_medtune_eval_adds_its_figures_to_the_adapter_card(adapter_copy: Path, tiny_model_dir: Path,
                                                           qa32_dir: Path, tmp_path: Path):
    from medtune.config import ModelArgs
    from medtune.evaluate.run import EvalArgs, evaluate

    out = evaluate(ModelArgs(model=str(tiny_model_dir), adapter=[str(adapter_copy)], profile="cpu"), qa32_dir,
                   tmp_path / "eval", EvalArgs(limit=4, max_new_tokens=8, batch_size=4, candidates=4, samples=1))
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    [entry] = json.loads((adapter_copy / EVALUATIONS).read_text(encoding="utf-8"))
    assert entry["output"] == str(out) and entry["system"] == "my_adapter"
    assert entry["figures"]["bleu-4"] == pytest.approx(metrics["systems"]["my_adapter"]["bleu-4"])
    assert entry["base_figures"]["answer_loss"] == pytest.approx(metrics["systems"]["base"]["loss"]["loss"])
    card = (adapter_copy / "README.md").read_text(encoding="utf-8")
    assert "| this model |" in card and "| base model |" in card and str(out) in card

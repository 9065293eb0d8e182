"""Model cards: the README.md of every adapter, merged model and GGUF export directory.

The card is rendered from the files medtune keeps in the directory — ``medtune.json`` (base model, plan,
LoRA settings, data counts and hash), ``data_manifest.json`` (the corpus: files, counts, hashes),
``train_config.yaml`` (the exact options) and ``evaluations.json`` (figures recorded by `medtune eval`) —
so it is rewritten, never edited: after training, merging, exporting, and after each evaluation.

    >>> write_model_card(Path("runs/qwen3-4b-qlora"))  # doctest: +SKIP

Imports no torch.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CARD = "README.md"
MANIFEST = "medtune.json"  # = medtune.modeling.MANIFEST (not imported: that module is heavier)
EVALUATIONS = "evaluations.json"
DATA_MANIFEST = "data_manifest.json"
TRAIN_CONFIG = "train_config.yaml"

DISCLAIMER_ZH = (
    "本模型仅供医学信息参考与研究，不能替代执业医师的诊断和治疗。模型可能生成错误、过时或不完整的内容；"
    "任何健康问题请咨询医生，出现胸痛、呼吸困难、意识改变、大出血等紧急情况请立即拨打 120 或前往急诊。"
)
DISCLAIMER_EN = (
    "This model is for medical information and research only and does not replace diagnosis or treatment by a "
    "licensed physician. It can produce wrong, outdated or incomplete content; consult a doctor about any health "
    "problem, and in an emergency (chest pain, difficulty breathing, altered consciousness, heavy bleeding) call "
    "your local emergency number (120 in mainland China) or go to an emergency department at once."
)
INTENDED_USE_ZH = (
    "预期用途：中文医疗健康问答的研究、教学和原型开发；在医生或专业人员监督下辅助整理健康信息。"
    "不适用于：临床诊断、处方或治疗决策，急救分诊，以及任何未经专业审核直接面向患者的场景。"
)
INTENDED_USE_EN = (
    "Intended use: research, teaching and prototyping of Chinese medical question answering; helping to "
    "organise health information under the supervision of a physician or other professional. Out of scope: "
    "clinical diagnosis, prescribing or treatment decisions, emergency triage, and any patient-facing use "
    "without professional review."
)
TITLES = {"lora": "LoRA adapter", "merged": "merged model", "gguf": "GGUF export"}
KINDS = {
    "lora": "LoRA adapter (peft)",
    "merged": "merged model (the adapter folded into the base; loads with plain transformers)",
    "gguf": "GGUF export for llama.cpp / Ollama",
}
FIGURES = (  # key in `figures`, column heading
    ("bleu-4", "BLEU-4"), ("rouge-l", "ROUGE-L"), ("relevance_top1", "relevance top-1"),
    ("department_consistency", "department consistency"), ("answer_loss", "answer loss"),
    ("perplexity", "perplexity"), ("exam_accuracy", "exam accuracy"),
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- evaluation figures

def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def figures(system: dict[str, Any]) -> dict[str, float]:
    """The headline figures of one system in `medtune eval`'s metrics.json (missing or NaN ones left out)."""
    exam = system.get("exam") or {}
    kind = next((k for k in ("single", "single_generated", "multi") if k in exam), None)
    found = {
        **{key: system.get(key) for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "corpus_bleu",
                                            "department_consistency")},
        "relevance_top1": (system.get("relevance") or {}).get("top1"),
        "answer_loss": (system.get("loss") or {}).get("loss"),
        "perplexity": (system.get("loss") or {}).get("perplexity"),
        "exam_accuracy": exam[kind].get("accuracy") if kind else None,
    }
    return {key: number for key, value in found.items() if (number := _number(value)) is not None}


def record_evaluation(model_dir: Path, metrics: dict[str, Any], system: str, output: Path) -> None:
    """Add ``system``'s figures from an evaluation (metrics.json content, written to ``output``) to
    ``model_dir/evaluations.json`` (the base's figures beside them) and rewrite the card. An evaluation
    written to the same ``output`` before is replaced."""
    model_dir = Path(model_dir)
    results = metrics.get("systems", {})
    entry = {
        "evaluated": time.strftime("%Y-%m-%d %H:%M"),
        "output": str(output),
        "system": system,
        "data": metrics.get("data"),
        "exam": metrics.get("exam"),
        "figures": figures(results.get(system, {})),
        "base_figures": figures(results["base"]) if system != "base" and "base" in results else None,
        "warnings": metrics.get("warnings", []),
    }
    previous = _read_json(model_dir / EVALUATIONS)
    entries = [e for e in previous if e.get("output") != str(output)] if isinstance(previous, list) else []
    (model_dir / EVALUATIONS).write_text(json.dumps(entries + [entry], ensure_ascii=False, indent=2) + "\n",
                                         encoding="utf-8")
    write_model_card(model_dir)


def record_evaluations(metrics: dict[str, Any], adapters: dict[str, Path], base_path: Path, output: Path) -> list[Path]:
    """After `medtune eval`: record each adapter's figures in its directory, or, with no adapter, the
    model's own. Only directories medtune wrote (with a medtune.json) are touched: a downloaded adapter
    or base keeps its publisher's card. Returns the directories updated; one that cannot be written is
    skipped with a warning (the evaluation itself is kept)."""
    candidates = dict(adapters) if adapters else {"base": Path(base_path)}
    targets = {name: Path(path) for name, path in candidates.items() if (Path(path) / MANIFEST).is_file()}
    done = []
    for system, path in targets.items():
        try:
            record_evaluation(path, metrics, system, output)
            done.append(Path(path))
        except OSError as e:
            log.warning("could not add the evaluation to the model card in %s: %s", path, e)
    return done


# ----------------------------------------------------------------------------- the card

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "—" if value is None else str(value)


def _front_matter(manifest: dict[str, Any], kind: str) -> str:
    base = manifest.get("base_model") or "Qwen/Qwen3-4B"
    library = {"lora": "peft", "merged": "transformers", "gguf": "gguf"}.get(kind, "transformers")
    tags = ["medical", "chinese", "qwen3", "medtune"] + (["lora"] if kind == "lora" else []) + (
        ["gguf", "ollama", "llama.cpp"] if kind == "gguf" else [])
    lines = ["---", f"base_model: {json.dumps(base, ensure_ascii=False)}", f"library_name: {library}",
             "language:", "- zh", "pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    return "\n".join(lines)


def _model_section(manifest: dict[str, Any], kind: str) -> list[str]:
    rows = [("Kind", KINDS.get(kind, kind)),
            ("Base model", manifest.get("base_model", "?") + (f" (revision {manifest['base_revision']})"
                                                              if manifest.get("base_revision") else "")),
            ("Prompt format", f"{manifest.get('prompt_format', 'qwen3-chat')} (Qwen3 chat template, thinking off)")]
    lora = manifest.get("lora") or {}
    if lora:
        scale = "alpha/sqrt(r)" if lora.get("use_rslora") else "alpha/r"
        rows.append(("LoRA", f"r={lora.get('lora_r')}, alpha={lora.get('lora_alpha')} (scale {scale}), dropout "
                             f"{lora.get('lora_dropout')}, on {', '.join(lora.get('target_modules', []))}"
                             + (", DoRA" if lora.get("use_dora") else "")))
    plan = manifest.get("plan") or {}
    if plan:
        quant = plan.get("quant", "none")
        how = "QLoRA (4-bit NF4 base)" if quant == "nf4" else "LoRA on int8 base" if quant == "int8" else "LoRA"
        rows.append(("Training", f"{how}, profile {plan.get('profile')}, {plan.get('precision')}, batch "
                                 f"{plan.get('micro_batch')} x {plan.get('grad_accum')}, {plan.get('max_seq_len')} "
                                 f"tokens per sequence"))
    result = manifest.get("result") or {}
    if result:
        rows.append(("Result", f"{_fmt(result.get('steps'))} steps ({_fmt(result.get('epochs'))} epochs), final "
                               f"loss {_fmt(result.get('final_loss'))}, {_fmt(result.get('runtime_s'))} s"))
    merged = manifest.get("merged_from")
    if merged:
        note = ("; trained with QLoRA, merged into the full-precision base, not into 4-bit weights"
                if merged.get("trained_quant") in ("nf4", "int8") else "")
        rows.append(("Merged", f"adapter {merged.get('adapter')} into {manifest.get('base_model')}, "
                               f"{merged.get('merged_dtype')} weights{note}"))
    gguf = manifest.get("gguf")
    if gguf:
        rows.append(("GGUF", f"{gguf.get('file')}: {gguf.get('outtype')}, {_fmt(gguf.get('tensors'))} tensors, "
                             f"{_fmt(gguf.get('parameters'))} parameters, {gguf.get('bytes', 0) / 2**20:.1f} MiB"))
    if manifest.get("versions"):
        rows.append(("Software", ", ".join(f"{k} {v}" for k, v in manifest["versions"].items())))
    return ["## Model", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def _data_section(manifest: dict[str, Any], data_manifest: dict[str, Any] | None) -> list[str]:
    data = manifest.get("data") or {}
    lines = ["## Data / 训练数据", ""]
    if not data and not data_manifest:
        return lines + ["Not recorded.", ""]
    if data_manifest:
        names = [f.get("name") or f.get("path") for f in data_manifest.get("files", [])]
        counts = data_manifest.get("counts", {})
        splits = counts.get("splits", {})
        lines.append(f"- Corpus: {', '.join(map(str, names)) or data_manifest.get('input', '?')}")
        lines.append(f"- Rows: {_fmt(counts.get('read'))} read, {_fmt(counts.get('kept'))} kept after cleaning and "
                     f"deduplication ({_fmt(counts.get('rejected'))} rejected); splits "
                     + ", ".join(f"{k} {_fmt(v)}" for k, v in splits.items()))
        for f in data_manifest.get("files", []):
            if f.get("sha256"):
                lines.append(f"- `{f.get('name')}` sha256 `{f['sha256']}`")
        departments = data_manifest.get("sub_departments") or data_manifest.get("departments") or {}
        top = [f"{k} {_fmt(v)}" for k, v in list(departments.items())[:8] if k]
        if top:
            lines.append(f"- Departments: {', '.join(top)}")
    if data:
        lines.append(f"- Training examples: {_fmt(data.get('examples'))} ({_fmt(data.get('tokens'))} tokens, "
                     f"{_fmt(data.get('answer_tokens'))} answer tokens; {_fmt(data.get('shortened'))} shortened, "
                     f"{_fmt(data.get('dropped'))} dropped)")
        if data.get("manifest_sha256"):
            lines.append(f"- Data manifest sha256 `{data['manifest_sha256']}` (`medtune eval` compares it to "
                         "the evaluation data's to warn of overlap)")
    return lines + [""]


def _config_section(model_dir: Path) -> list[str]:
    path = model_dir / TRAIN_CONFIG
    if not path.is_file():
        return []
    text = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#"))
    return ["## Training configuration", "", f"The exact options (`medtune train --config {TRAIN_CONFIG}` reruns them):",
            "", "```yaml", text.strip(), "```", ""]


def _evaluation_section(evaluations: list[dict[str, Any]] | None, model_dir: Path, kind: str) -> list[str]:
    lines = ["## Evaluation / 评测", ""]
    if not evaluations:
        target = f"--adapter {model_dir}" if kind == "lora" else f"--model {model_dir}"
        return lines + [f"Not evaluated yet: `medtune eval {target} --data DATA --output EVAL` adds the figures here.", ""]
    if kind in ("merged", "gguf"):
        lines += ["Figures measured with `medtune eval` (on the adapter before merging, or on this model).", ""]
    for e in evaluations:
        data = e.get("data") or {}
        lines.append(f"**{e.get('evaluated')}**, {data.get('path', '?')} ({data.get('split', '?')} split, "
                     f"{_fmt(data.get('examples'))} examples), report in `{e.get('output')}`"
                     + (f"; exam {e['exam']['path']} ({_fmt(e['exam']['questions'])} questions)" if e.get("exam") else ""))
        lines.append("")
        cols = [(k, h) for k, h in FIGURES if k in e.get("figures", {}) or k in (e.get("base_figures") or {})]
        if cols:
            lines.append("| | " + " | ".join(h for _, h in cols) + " |")
            lines.append("|---|" + "---|" * len(cols))
            rows = [("this model", e.get("figures") or {})]
            if e.get("base_figures"):
                rows.append(("base model", e["base_figures"]))
            for label, figs in rows:
                lines.append(f"| {label} | " + " | ".join(_fmt(figs.get(k)) for k, _ in cols) + " |")
            lines.append("")
        for w in e.get("warnings") or []:
            lines += [f"> Warning: {w}", ""]
    return lines


def _usage_section(manifest: dict[str, Any], model_dir: Path, kind: str) -> list[str]:
    base = manifest.get("base_model", "Qwen/Qwen3-4B")
    if kind == "lora":
        cmds = [f"medtune eval --adapter {model_dir} --data DATA --output EVAL",
                f"medtune merge --adapter {model_dir} --output MERGED",
                "medtune export --model MERGED --output GGUF_DIR --outtype q8_0"]
        note = f"The base ({base}) is found from `medtune.json`; answers must use the same chat format (thinking off)."
    elif kind == "merged":
        cmds = [f"medtune eval --model {model_dir} --data DATA --output EVAL",
                f"medtune export --model {model_dir} --output GGUF_DIR --outtype q8_0"]
        note = "Plain `transformers.AutoModelForCausalLM.from_pretrained` loads this directory (no peft)."
    else:
        gguf = (manifest.get("gguf") or {}).get("file", "MODEL.gguf")
        cmds = [f"cd {model_dir} && ollama create medtune-med -f Modelfile && ollama run medtune-med",
                f"llama-cli -m {model_dir}/{gguf} -cnv"]
        note = ("The Modelfile renders medtune's chat format (Qwen3, thinking off) and stops at `<|im_end|>`; the "
                "GGUF's chat template has thinking off by default too.")
    return ["## Use", "", note, "", "```bash", *cmds, "```", ""]


def render_card(model_dir: Path) -> str:
    """The model card of ``model_dir`` (an adapter, merged model or GGUF export directory)."""
    model_dir = Path(model_dir)
    manifest = _read_json(model_dir / MANIFEST) or {}
    kind = manifest.get("kind", "lora")
    data_manifest = _read_json(model_dir / DATA_MANIFEST)
    evaluations = _read_json(model_dir / EVALUATIONS)
    title = f"{model_dir.resolve().name}: {TITLES.get(kind, kind)} of {manifest.get('base_model', 'Qwen3')}"
    lines = [
        _front_matter(manifest, kind),
        f"# {title}",
        "",
        "Fine-tuned with medtune for Chinese medical question answering (中文医疗问答微调模型).",
        "",
        f"> **医疗免责声明：** {DISCLAIMER_ZH}",
        ">",
        f"> **Medical disclaimer:** {DISCLAIMER_EN}",
        "",
        *_model_section(manifest, kind),
        *_data_section(manifest, data_manifest),
        *_config_section(model_dir),
        *_evaluation_section(evaluations if isinstance(evaluations, list) else None, model_dir, kind),
        *_usage_section(manifest, model_dir, kind),
        "## Intended use / 预期用途", "", INTENDED_USE_ZH, "", INTENDED_USE_EN, "",
        "## Disclaimer / 免责声明", "", DISCLAIMER_ZH, "", DISCLAIMER_EN, "",
    ]
    return "\n".join(lines)


CARD_SOURCES = (DATA_MANIFEST, TRAIN_CONFIG, EVALUATIONS)


def copy_card_sources(source: Path, target: Path, extra: tuple[str, ...] = ()) -> None:
    """Copy the files a card is rendered from (data manifest, training config, evaluations), and ``extra``
    ones, from an adapter to its merged model or from a merged model to its export."""
    import shutil

    for name in CARD_SOURCES + extra:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(target) / name)


def write_model_card(model_dir: Path) -> Path:
    """(Re)write ``model_dir/README.md`` from the directory's medtune files; returns its path."""
    path = Path(model_dir) / CARD
    path.write_text(render_card(model_dir), encoding="utf-8")
    return path

"""`make demo`: the whole pipeline on the public sample, on the CPU, into runs/demo/.

Runs the same `medtune` commands a user runs; nothing in the library knows it is a demo.

    python -m medtune.demo [--out runs/demo]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
import urllib.request
from pathlib import Path

from medtune.cli import main as medtune

SAMPLE_NAME = "toyhom_neike_sample.csv"
SAMPLE_SHA256 = "133e5f7e9a3255468375c258381d131b1dc0a4fff6d431cbe743884139b1eb25"
# The published sample file of the dataset (Toyhom/Chinese-medical-dialogue-data, MIT licence).
SAMPLE_URL = ("https://raw.githubusercontent.com/Toyhom/Chinese-medical-dialogue-data/"
              "master/%E6%A0%B7%E4%BE%8B_%E5%86%85%E7%A7%915000-6000.csv")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_sample(out: Path) -> Path:
    """../shared/data when present; else a checked download; else a clear message."""
    for candidate in (Path.cwd().parent / "shared" / "data" / SAMPLE_NAME, out / SAMPLE_NAME):
        if candidate.is_file():
            if _sha256(candidate) != SAMPLE_SHA256:
                sys.exit(f"demo: {candidate} does not match the published sha256 {SAMPLE_SHA256}")
            return candidate
    target = out / SAMPLE_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"demo: downloading the public sample from {SAMPLE_URL}")
    try:
        with urllib.request.urlopen(SAMPLE_URL, timeout=20) as r:
            data = r.read()
    except OSError as e:
        sys.exit(f"demo: could not download the sample ({e}).\n"
                 f"Put the dataset's sample file 样例_内科5000-6000.csv at {target} and run `make demo` again.")
    if hashlib.sha256(data).hexdigest() != SAMPLE_SHA256:
        sys.exit("demo: the downloaded sample does not match its published sha256; not using it")
    target.write_bytes(data)
    return target


def step(title: str, *argv: str) -> None:
    print(f"\n=== {title}\n$ medtune {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    code = medtune(list(argv))
    if code:
        sys.exit(f"demo: step failed ({title}), exit status {code}")
    print(f"--- {title}: {time.perf_counter() - t0:.1f} s", flush=True)


QUESTIONS = [
    ("高血压患者平时饮食要注意什么？", "心血管科"),
    ("我爸刚才吃饭时突然嘴歪了，右手拿不住筷子，说话也含糊不清，怎么办？", "神经科"),
]
REAL_COMMAND = ("medtune train --model Qwen/Qwen3-4B --data runs/demo/data --output runs/qwen3-4b-qlora "
                "--profile cuda-8gb")


def answer_questions(model_dir: Path, adapter: Path) -> list[tuple[str, str]]:
    """Answer ``QUESTIONS`` with the fine-tuned tiny model through the library's inference function."""
    from medtune.config import ModelArgs
    from medtune.infer import GenerationArgs, Query, respond
    from medtune.modeling import load_for_inference
    from medtune.safety import DISCLAIMER, assess

    model, tokenizer, info = load_for_inference(ModelArgs(model=str(model_dir), adapter=[str(adapter)], profile="cpu"))
    print(info.summary())
    answers = respond(model, tokenizer, [Query(q, department=d) for q, d in QUESTIONS],
                      GenerationArgs(greedy=True, max_new_tokens=80))
    shown = []
    for (question, _), a in zip(QUESTIONS, answers):
        verdict = assess(question)
        a.notice, a.disclaimer = verdict.notice, DISCLAIMER
        a.emergency, a.emergency_category = verdict.emergency, verdict.category
        print(f"\n问：{question}\n{a.text}")
        shown.append((question, a.text))
    return shown


def run(out: Path, steps: int = 80) -> None:
    t0 = time.perf_counter()
    sample = find_sample(out)
    data, model_dir, adapter = out / "data", out / "tiny-qwen3", out / "tiny-lora"
    step("1/5 prepare the data", "data", "prepare", "--input", str(sample), "--output", str(data),
         "--department", "内科")
    step("2/5 data report", "data", "report", "--data", str(data))
    step("3/5 build the tiny model", "tiny-model", "--data", str(data), "--output", str(model_dir))
    step("4/5 fine-tune with LoRA", "train", "--model", str(model_dir), "--data", str(data), "--output",
         str(adapter), "--profile", "cpu", "--max-steps", str(steps), "--lr", "3e-3", "--logging-steps", "10",
         "--overwrite")
    print("\n=== 5/5 answer two questions (one ordinary, one emergency)", flush=True)
    shown = answer_questions(model_dir, adapter)
    lines = ["# medtune demo", "",
             "The model here is a **tiny, randomly initialised Qwen3** trained for a few steps on the CPU: it only",
             "shows the machinery, and its answers are not medical advice. The same commands with a real model:",
             "", f"    {REAL_COMMAND}", "",
             "- Data report: [data/report/report.md](data/report/report.md)",
             "- Adapter: `tiny-lora/` (with `medtune.json`, the data manifest and the department classifier)", "",
             "## Sample answers", ""]
    for q, text in shown:
        lines += [f"**问：** {q}", "", "> " + text.replace("\n", "\n> "), ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"\nDemo finished in {time.perf_counter() - t0:.0f} s: see {out}/report.md")
    print("The tiny model is randomly initialised: it shows the machinery only. With Qwen3-4B on a GPU:")
    print(f"  {REAL_COMMAND}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=80, help="LoRA training steps")
    ns = p.parse_args()
    run(ns.out, ns.steps)

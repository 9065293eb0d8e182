"""`make demo`: the whole pipeline on the public sample, on the CPU, into runs/demo/.

Runs the same `medtune` commands a user runs; nothing in the library knows it is a demo.

    python -m medtune.demo [--out runs/demo]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import sys
import time
import urllib.request
from pathlib import Path
from typing import TextIO

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


def step(title: str, *argv: str, capture: bool = False) -> str:
    """Run one `medtune` command as a demo step; with ``capture``, also return what it printed."""
    print(f"\n=== {title}\n$ medtune {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee) if capture else contextlib.nullcontext():
        code = medtune(list(argv))
    if code:
        sys.exit(f"demo: step failed ({title}), exit status {code}")
    print(f"--- {title}: {time.perf_counter() - t0:.1f} s", flush=True)
    return "".join(tee.parts).strip()


class _Tee(io.TextIOBase):
    """Writes to the terminal and keeps a copy (the streamed answer is shown live and put in the report)."""

    def __init__(self, terminal: TextIO) -> None:
        self.terminal, self.parts = terminal, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.terminal.write(text)

    def flush(self) -> None:
        self.terminal.flush()


QUESTIONS = [
    ("高血压患者平时饮食要注意什么？", "心血管科"),
    ("我爸刚才吃饭时突然嘴歪了，右手拿不住筷子，说话也含糊不清，怎么办？", "神经科"),
]
EVAL_EXAMPLES = 40  # held-out test questions scored for the base and the fine-tuned model
REAL_COMMAND = "medtune train --config configs/qwen3-4b/qlora-8gb.yaml --data runs/demo/data"


def run(out: Path, steps: int = 80) -> None:
    t0 = time.perf_counter()
    sample = find_sample(out)
    data, model_dir, adapter = out / "data", out / "tiny-qwen3", out / "tiny-lora"
    step("1/6 prepare the data", "data", "prepare", "--input", str(sample), "--output", str(data),
         "--department", "内科")
    step("2/6 data report", "data", "report", "--data", str(data))
    step("3/6 build the tiny model", "tiny-model", "--data", str(data), "--output", str(model_dir))
    step("4/6 fine-tune with LoRA", "train", "--model", str(model_dir), "--data", str(data), "--output",
         str(adapter), "--profile", "cpu", "--max-steps", str(steps), "--lr", "3e-3", "--logging-steps", "10",
         "--overwrite")
    step("5/6 evaluate base vs fine-tuned on held-out questions", "eval", "--model", str(model_dir), "--adapter",
         str(adapter), "--data", str(data), "--output", str(out / "eval"), "--profile", "cpu", "--limit",
         str(EVAL_EXAMPLES), "--max-new-tokens", "64", "--batch-size", "8")
    shown = [(q, step(f"6/6 answer: {q}", "ask", q, "--model", str(model_dir), "--adapter", str(adapter),
                      "--profile", "cpu", "--department", d, "--greedy", "--max-new-tokens", "80", capture=True))
             for q, d in QUESTIONS]
    lines = ["# medtune demo", "",
             "The model here is a **tiny, randomly initialised Qwen3** trained for a few steps on the CPU: it only",
             "shows the machinery, and its answers are not medical advice. The same commands with a real model:",
             "", f"    {REAL_COMMAND}", "",
             "- Data report: [data/report/report.md](data/report/report.md)",
             "- Training loss: [tiny-lora/loss_curve.png](tiny-lora/loss_curve.png)",
             "- Evaluation, base vs fine-tuned: [eval/report.md](eval/report.md)", "",
             "![loss curve](tiny-lora/loss_curve.png)", "",
             "![metrics](eval/metrics.png)", "",
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

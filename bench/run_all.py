"""`make bench`: run every benchmark script in bench/ and write bench/RESULTS.md.

    python bench/run_all.py                      # every script, with its default settings
    python bench/run_all.py --only serve_load    # one script (its name without .py); repeatable
    python bench/run_all.py --list               # which scripts would run

Each script prints, as one of its last lines, a JSON object with a ``figures`` list; each figure has
``name``, ``value``, ``unit`` and, where it has one, the ``baseline`` measured in the same run and the
``ratio`` (and optionally ``goal``, a text such as ">= 3x"). A script that cannot run here (no GPU, say)
exits with status 77 and says why on its last output line: it is listed as skipped, not failed. The table
in RESULTS.md keeps every figure beside its baseline, and the raw output of each script goes to
bench/out/<script>.log.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SKIPPED = 77  # the automake convention for "cannot run here"
NOT_SCRIPTS = {"run_all.py"}


@dataclass
class Outcome:
    script: str
    status: str  # ok | skipped | failed
    seconds: float
    figures: list[dict] = field(default_factory=list)
    reason: str = ""


def scripts(only: list[str]) -> list[Path]:
    found = sorted(p for p in BENCH.glob("*.py") if p.name not in NOT_SCRIPTS and not p.name.startswith("_"))
    if only:
        names = {p.stem: p for p in found}
        missing = [o for o in only if o not in names]
        if missing:
            sys.exit(f"run_all: no bench script named {', '.join(missing)} (have: {', '.join(names)})")
        found = [names[o] for o in only]
    return found


def figures_in(output: str) -> list[dict]:
    """The ``figures`` of the last JSON line in ``output`` that has them."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"figures"' in line:
            try:
                return list(json.loads(line)["figures"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return []


def run_script(path: Path, log_dir: Path, timeout: float) -> Outcome:
    print(f"\n=== bench/{path.name}", flush=True)
    log = log_dir / f"{path.stem}.log"
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=BENCH.parent, bufsize=1)
        lines: list[str] = []
        assert proc.stdout is not None
        try:
            for line in proc.stdout:  # shown live: benchmarks run for minutes
                sys.stdout.write(line)
                sink.write(line)
                lines.append(line)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            lines.append(f"timed out after {timeout:.0f} s\n")
    seconds = time.perf_counter() - t0
    output = "".join(lines)
    last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
    if proc.returncode == SKIPPED:
        return Outcome(path.stem, "skipped", seconds, reason=last)
    found = figures_in(output)
    if proc.returncode != 0 or not found:
        why = f"exit status {proc.returncode}" if proc.returncode else "no figures line"
        return Outcome(path.stem, "failed", seconds, found, reason=f"{why}: {last}")
    return Outcome(path.stem, "ok", seconds, found)


def _fmt(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def machine() -> str:
    try:
        import torch  # noqa: PLC0415 - only for the versions line
        torch_line = f"torch {torch.__version__}" + (f", CUDA {torch.cuda.get_device_name(0)}"
                                                      if torch.cuda.is_available() else ", no GPU")
    except ImportError:
        torch_line = "no torch"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPU cores, {torch_line}; "
            f"load average {load:.1f} when the table was written")


def write_results(path: Path, outcomes: list[Outcome]) -> None:
    lines = ["# Benchmark results", "",
             f"Written by `make bench` (bench/run_all.py) on {time.strftime('%Y-%m-%d %H:%M %Z')}.", "",
             f"Machine: {machine()}.", "",
             "Each figure's baseline was measured in the same run as the figure; the ratio is figure / baseline "
             "(for times and memory, lower is better: see the unit). Raw output: `bench/out/<script>.log`.", "",
             "| script | figure | value | unit | baseline | ratio | goal |",
             "|---|---|---:|---|---:|---:|---|"]
    for o in outcomes:
        for f in o.figures:
            lines.append(f"| {o.script} | {f.get('name', '?')} | {_fmt(f.get('value'))} | {f.get('unit', '')} | "
                         f"{_fmt(f.get('baseline'))} | {_fmt(f.get('ratio'))} | {f.get('goal', '')} |")
    lines += ["", "| script | status | seconds | note |", "|---|---|---:|---|"]
    for o in outcomes:
        note = o.reason.replace("|", "\\|")[:300]
        lines.append(f"| {o.script} | {o.status} | {o.seconds:,.0f} | {note} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run only this script (name without .py)")
    parser.add_argument("--list", action="store_true", help="list the scripts and exit")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed to each script")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()
    found = scripts(args.only)
    if args.list:
        print("\n".join(p.name for p in found))
        return 0
    log_dir = BENCH / "out"
    log_dir.mkdir(exist_ok=True)
    outcomes = [run_script(p, log_dir, args.timeout) for p in found]
    write_results(args.results, outcomes)
    print(f"\nwrote {args.results}")
    for o in outcomes:
        print(f"  {o.script:<20} {o.status:<8} {o.seconds:7.0f} s  {o.reason}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())

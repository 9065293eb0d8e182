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


def run(out: Path) -> None:
    sample = find_sample(out)
    data = out / "data"
    step("1. prepare the data", "data", "prepare", "--input", str(sample), "--output", str(data),
         "--department", "内科")
    step("2. data report", "data", "report", "--data", str(data))
    print(f"\nDemo finished: see {out}/ (data report: {data}/report/report.md)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    run(p.parse_args().out)

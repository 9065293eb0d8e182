"""Benchmark `medtune data prepare` against the seed's pandas loader on an ~800,000-row corpus.

    python bench/data_prepare.py                       # 800,000 rows, corpus kept in bench/out/data_prepare
    python bench/data_prepare.py --rows 50000          # a quick run

1. Builds (or reuses) a GB18030 corpus in the Toyhom six-folder layout from the shared 7,644-row sample:
   base rows are NEW recombinations of sentence fragments of different questions and answers (so they
   are not near-duplicates of each other, unlike plain copies, which would collapse to ~7,600 clusters),
   plus ~10% near-duplicates (a base row with a few characters changed or inserted and a punctuation
   mark swapped) and ~5% exact duplicates. Sub-departments and titles come from sampled rows; question
   and answer lengths follow the sample's.
2. Times, each in a fresh subprocess whose process tree's peak memory (RSS and PSS) is sampled: (a) the whole `prepare` pipeline
   (Python API; rows and seconds per stage from the manifest) and (b) the seed's loader: `pandas.read_csv`
   with an encoding-retry loop, then `iterrows()` building instruction/input/output dicts with a
   200-character filter, no cleaning, no dedup.
3. Prints rows/s of each, their ratio, peak memory, and the share of rows `prepare` kept; exits 1 if
   prepare kept a smaller share than the corpus was built to keep (or a far larger one: duplicates left
   in), or was slower than (b). The last line is one JSON object; its ``figures`` list (throughput and
   peak memory against the seed loader's, share kept) is what bench/run_all.py collects.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "toyhom_neike_sample.csv"
CORPUS_VERSION = 1  # bump when the generator changes, so a cached corpus is rebuilt
NEAR_SHARE, EXACT_SHARE = 0.10, 0.05
FRAGMENT_MAX = 48  # longer sentences are cut at commas, so recombinations differ by more than one long sentence
SENTENCE = re.compile(r"[^。！？；!?]+[。！？；!?]*")
PUNCT_SWAPS = {"，": "、", "、": "，", "。": "！", "！": "。", "？": "。", "；": "，"}


# ----------------------------------------------------------------------------- corpus

def read_sample(path: Path) -> list[list[str]]:
    with open(path, encoding="gb18030", newline="") as f:
        header, *rows = csv.reader(f)
    assert header == ["department", "title", "ask", "answer"], header
    return rows


def fragments(texts: list[str]) -> np.ndarray:
    """Sentences of ``texts``; a sentence over FRAGMENT_MAX characters is cut after a comma."""
    out: list[str] = []
    for text in texts:
        for sent in SENTENCE.findall(text):
            if len(sent) <= FRAGMENT_MAX:
                out.append(sent)
                continue
            piece = ""
            for clause in re.findall(r"[^，,]+[，,]?", sent):
                if piece and len(piece) + len(clause) > FRAGMENT_MAX:
                    out.append(piece)
                    piece = ""
                piece += clause
            if piece:
                out.append(piece)
    return np.array([f for f in out if len(f.strip()) >= 2], dtype=object)


def compose(pool: np.ndarray, targets: np.ndarray, rng: np.random.Generator, min_parts: int,
            max_parts: int = 24) -> list[str]:
    """One text per target length: random fragments of ``pool`` (from different rows) until it is reached."""
    lengths = np.fromiter((len(s) for s in pool), dtype=np.int64, count=len(pool))
    idx = rng.integers(0, len(pool), size=(len(targets), max_parts))
    reached = (lengths[idx].cumsum(axis=1) < targets[:, None]).sum(axis=1) + 1
    count = np.clip(reached, min_parts, max_parts)
    texts = ["".join(parts[:c]) for parts, c in zip(pool[idx].tolist(), count.tolist())]
    # A text cut after a comma ends as a sentence does.
    return [t[:-1] + "。" if t[-1] in "，,、" else t for t in texts]


def _mean_len(pool: np.ndarray) -> int:
    return int(np.mean([len(s) for s in pool]))


def near_duplicate(row: list[str], rng: np.random.Generator, charset: str) -> list[str]:
    """A few characters of the answer changed or inserted, one punctuation mark swapped."""
    dept, title, ask, answer = row
    chars = list(answer)
    for _ in range(int(rng.integers(1, 3))):
        chars[int(rng.integers(0, len(chars)))] = charset[int(rng.integers(0, len(charset)))]
    chars.insert(int(rng.integers(0, len(chars))), charset[int(rng.integers(0, len(charset)))])
    marks = [i for i, c in enumerate(chars) if c in PUNCT_SWAPS]
    if marks:
        i = marks[int(rng.integers(0, len(marks)))]
        chars[i] = PUNCT_SWAPS[chars[i]]
    return [dept, title, ask, "".join(chars)]


def build_corpus(rows_total: int, out: Path, seed: int = 0) -> dict:
    """Write the corpus under ``out/Data_数据``; returns its description (counts per kind, per folder)."""
    from medtune.data import PUBLISHED_ROWS
    from medtune.data.download import DATA_DIR, FILES

    rng = np.random.default_rng(seed)
    sample = read_sample(SAMPLE)
    ask_pool, answer_pool = fragments([r[2] for r in sample]), fragments([r[3] for r in sample])
    ask_len = np.array([len(r[2]) for r in sample])
    answer_len = np.array([len(r[3]) for r in sample])
    charset = "".join(sorted({c for r in sample for c in r[3] if "\u4e00" <= c <= "\u9fff"}))

    n_exact, n_near = round(rows_total * EXACT_SHARE), round(rows_total * NEAR_SHARE)
    n_base = rows_total - n_exact - n_near
    origin = rng.integers(0, len(sample), size=n_base)  # the row lending title and sub-department
    # The last fragment overshoots its target by half a fragment on average: aim that much lower.
    ask_target = ask_len[rng.integers(0, len(sample), n_base)] - _mean_len(ask_pool) // 2
    answer_target = answer_len[rng.integers(0, len(sample), n_base)] - _mean_len(answer_pool) // 2
    asks = compose(ask_pool, ask_target, rng, min_parts=2)
    answers = compose(answer_pool, answer_target, rng, min_parts=3)
    base = [[sample[o][0], sample[o][1], a, b] for o, a, b in zip(origin.tolist(), asks, answers)]
    near_of = rng.integers(0, n_base, size=n_near)
    exact_of = rng.integers(0, n_base, size=n_exact)
    rows = base + [near_duplicate(base[i], rng, charset) for i in near_of.tolist()] + [base[i] for i in exact_of.tolist()]
    # Each base row's department folder; its duplicates go where it went, and every file is shuffled.
    weights = np.array(list(PUBLISHED_ROWS.values()), dtype=float)
    folder_of_base = rng.choice(len(FILES), size=n_base, p=weights / weights.sum())
    folder = np.concatenate([folder_of_base, folder_of_base[near_of], folder_of_base[exact_of]])
    order = rng.permutation(len(rows))
    per_folder = {}
    for k, (name, filename) in enumerate(FILES.items()):
        pick = order[folder[order] == k]
        buf = io.StringIO(newline="")
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["department", "title", "ask", "answer"])
        writer.writerows(rows[i] for i in pick.tolist())
        dest = out / DATA_DIR / name / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(buf.getvalue().encode("gb18030"))
        per_folder[name] = int(len(pick))
    np.save(out / "base_rows.npy", np.array([[len(r[1]), len(r[2]), len(r[3]), r[1] in r[2]] for r in base],
                                            dtype=np.int32))
    return {
        "rows": rows_total, "base": n_base, "near_duplicates": n_near, "exact_duplicates": n_exact,
        "per_folder": per_folder, "seed": seed,
    }


def corpus(rows_total: int, workdir: Path, seed: int) -> tuple[Path, dict]:
    """The corpus for these settings, built unless an identical one is already in ``workdir``."""
    from medtune.data.download import DATA_DIR

    key = hashlib.sha256(f"{CORPUS_VERSION}:{rows_total}:{seed}:{SAMPLE.stat().st_size}".encode()).hexdigest()[:16]
    meta_path = workdir / "corpus.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and (workdir / DATA_DIR).is_dir():
            print(f"reusing corpus {workdir / DATA_DIR} ({meta['rows']:,} rows)")
            return workdir / DATA_DIR, meta
    t0 = time.perf_counter()
    meta = build_corpus(rows_total, workdir, seed)
    meta["key"] = key
    meta["build_seconds"] = round(time.perf_counter() - t0, 1)
    meta_path.write_text(json.dumps(meta))
    size = sum(p.stat().st_size for p in (workdir / DATA_DIR).rglob("*.csv"))
    print(f"built corpus {workdir / DATA_DIR}: {rows_total:,} rows ({meta['base']:,} base, "
          f"{meta['near_duplicates']:,} near-duplicates, {meta['exact_duplicates']:,} exact duplicates), "
          f"{size / 1e6:.0f} MB GB18030, in {meta['build_seconds']} s")
    return workdir / DATA_DIR, meta


# ----------------------------------------------------------------------------- (b) the seed's approach

def seed_load(data_dir: Path) -> tuple[int, list[dict]]:
    """The seed's loader, as it was: pandas with an encoding-retry loop, iterrows(), a 200-character filter."""
    import pandas as pd

    records, read = [], 0
    for path in sorted(data_dir.rglob("*.csv")):
        df = None
        for encoding in ("utf-8", "gbk", "gb18030", "gb2312", "utf-16"):
            try:
                df = pd.read_csv(path, encoding=encoding)
                break
            except (UnicodeDecodeError, UnicodeError):
                continue
        if df is None:
            print(f"skipping {path}: unknown encoding")
            continue
        read += len(df)
        for _, row in df.iterrows():
            question = str(row["title"]) + "，" + str(row["ask"])
            answer = str(row["answer"])
            if len(question) > 200 or len(answer) > 200:
                continue
            records.append({"instruction": question, "input": "", "output": answer,
                            "department": str(row["department"])})
    return read, records


# ----------------------------------------------------------------------------- one measured stage (child)

def run_stage(stage: str, data_dir: Path, output: Path) -> dict:
    """Run one contender in this (fresh) process; its own wall time, rows and ru_maxrss."""
    def cpu() -> float:
        return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))

    if stage == "baseline":
        import pandas  # noqa: F401  (import cost is not the seed's loading time)

        cpu0, t0 = cpu(), time.perf_counter()
        read, records = seed_load(data_dir)
        result = {"rows_in": read, "rows_kept": len(records)}
    else:
        from medtune.data.kernels import warm_up
        from medtune.data.prepare import prepare

        # numba's compiled kernels are cached on disk: only a first run after installing compiles them
        # (~12 s, once). Load (or build) that cache before the clock starts, as pandas is imported above.
        print(f"    kernels ready in {warm_up():.1f} s", file=sys.stderr)
        cpu0, t0 = cpu(), time.perf_counter()
        manifest = prepare(data_dir, output)
        result = {"rows_in": manifest["counts"]["read"], "rows_kept": manifest["counts"]["kept"], "manifest": manifest}
    result["seconds"] = time.perf_counter() - t0
    # CPU seconds of this process and its (joined) workers: less sensitive than wall time to other work
    # on the machine, and they show how much of the two cores each contender used.
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    result["cpu_seconds"] = round(sum(u.ru_utime + u.ru_stime for u in usage) - cpu0, 2)
    self_rss, child_rss = usage[0].ru_maxrss, usage[1].ru_maxrss
    result["ru_maxrss_mb"] = round(max(self_rss, child_rss) / 1024, 1)
    return result


def measure(stage: str, data_dir: Path, output: Path) -> dict:
    """Run ``stage`` in a fresh interpreter, sampling the memory of its whole process tree (workers included).

    Both the sum of RSS (counts pages shared between the processes once per process) and the sum of
    PSS (shares them out) are sampled, RSS every 50 ms and PSS every second; their peaks are reported.
    """
    import psutil

    cmd = [sys.executable, __file__, "--stage", stage, "--data", str(data_dir), "--prepared", str(output)]
    log_path = output.parent / f"{stage}.log"
    log_file = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=ROOT)
    ps, peak_rss, peak_pss, tick = psutil.Process(proc.pid), 0, 0, 0
    while proc.poll() is None:
        # RSS comes from /proc/<pid>/statm (cheap). PSS needs a walk of every page table
        # (/proc/<pid>/smaps_rollup): sampled every 20th time only, as at 20 Hz the walks would take a
        # good share of a core from the contender that uses both cores.
        rss = pss = 0
        full = tick % 20 == 0
        try:
            for p in [ps, *ps.children(recursive=True)]:
                mem = p.memory_full_info() if full else p.memory_info()
                rss, pss = rss + mem.rss, pss + getattr(mem, "pss", mem.rss)
        except psutil.Error:  # a worker ended while being read: skip this sample
            pass
        peak_rss = max(peak_rss, rss)
        if full:
            peak_pss = max(peak_pss, pss)
        tick += 1
        time.sleep(0.05)
    out = proc.stdout.read()
    log_file.close()
    if proc.returncode != 0:
        sys.exit(f"{stage} failed (exit {proc.returncode}):\n{out[-2000:]}{log_path.read_text()[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(max(peak_rss / 2**20, result["ru_maxrss_mb"]), 1)
    result["peak_pss_mb"] = round(peak_pss / 2**20, 1)
    return result


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=800_000, help="corpus rows")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "data_prepare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["baseline", "prepare"], help="time one contender only (no verdict)")
    parser.add_argument("--stage", choices=["baseline", "prepare"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepared", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:  # the child process of `measure`
        print(json.dumps(run_stage(args.stage, args.data, args.prepared)))
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    data_dir, meta = corpus(args.rows, args.workdir, args.seed)
    results, load_before = {}, os.getloadavg()[0]
    for stage in ("baseline", "prepare"):
        if args.only in (None, stage):
            print(f"timing {stage} ...", flush=True)
            results[stage] = measure(stage, data_dir, args.workdir / "prepared")
    # Other work on the machine slows both contenders: the 1-minute load average says how busy it was.
    print(f"load average (1 min): {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores")
    return report(meta, results, args.workdir, {"load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                                               "cores": os.cpu_count()})


def built_to_keep(workdir: Path) -> int:
    """Base rows whose question and answer lengths pass prepare's default length filter."""
    from medtune.data.prepare import PrepareArgs

    defaults = PrepareArgs()
    title, ask, answer, title_in_ask = np.load(workdir / "base_rows.npy").T
    # prepare's question: the ask alone when it holds the title, else title + line break + ask.
    question = np.where(title_in_ask == 1, ask, title + 1 + ask)
    ok = ((question >= defaults.min_question_length) & (question <= defaults.max_question_length)
          & (answer >= defaults.min_answer_length) & (answer <= defaults.max_answer_length))
    return int(ok.sum())


# Judged on raw lengths, while prepare filters cleaned text: cleaning only shortens rows (whole boilerplate
# sentences, whitespace), and at the defaults the base rows are far from the bounds (questions >= ~20
# characters against a minimum of 4, answers >= ~100 against 10), so next to no row can flip. The same
# 0.1% of the rows also covers a chance MinHash link between two unrelated base rows (none at 50,000 rows).
KEPT_TOLERANCE = 0.001
# The other way round: a prepare that skipped deduplication would keep all 15% of duplicates and run faster.
# Exact duplicates must all go; of the near-duplicates, random edits leave a few under the default Jaccard
# threshold (measured: ~0.02% of the rows), so 1% of the rows is allowed above the built-to-keep share.
KEPT_EXCESS = 0.01


def report(meta: dict, results: dict, workdir: Path, machine: dict) -> int:
    """Print the figures and the verdict; the last line is one JSON object. Returns the exit status."""
    rows = meta["rows"]
    keep = built_to_keep(workdir)
    summary = {"bench": "data_prepare", "rows": rows, "base_rows": meta["base"],
               "near_duplicates": meta["near_duplicates"], "exact_duplicates": meta["exact_duplicates"],
               "built_to_keep": keep, "built_to_keep_share": round(keep / rows, 5), **machine}
    print(f"corpus: {rows:,} rows = {meta['base']:,} base ({keep:,} pass prepare's default length filter: "
          f"built to keep {keep / rows:.2%}) + {meta['near_duplicates']:,} near-duplicates "
          f"+ {meta['exact_duplicates']:,} exact duplicates")
    for stage, r in results.items():
        r["rows_per_s"] = r["rows_in"] / r["seconds"]
        summary[stage] = {k: (round(v, 2) if isinstance(v, float) else v)
                          for k, v in r.items() if k in ("rows_in", "rows_kept", "seconds", "cpu_seconds", "rows_per_s",
                                                        "peak_rss_mb", "peak_pss_mb")}
    failures = []
    if "baseline" in results:
        b = results["baseline"]
        print(f"(b) seed loader (pandas + encoding retry + iterrows, 200-char filter): {b['rows_in']:,} rows in "
              f"{b['seconds']:.1f} s = {b['rows_per_s']:,.0f} rows/s, peak RSS {b['peak_rss_mb']:,.0f} MB "
              f"({b['rows_kept']:,} rows pass its filter, no cleaning, no dedup)")
    if "prepare" in results:
        p = results["prepare"]
        stages = p["manifest"]["stages"]
        print(f"(a) medtune data prepare: {p['rows_in']:,} rows in {p['seconds']:.1f} s = {p['rows_per_s']:,.0f} rows/s, "
              f"peak memory of the process tree: RSS {p['peak_rss_mb']:,.0f} MB, PSS (sampled each second) {p['peak_pss_mb']:,.0f} MB "
              f"(largest single process {p['ru_maxrss_mb']:,.0f} MB)")
        print(f"    {'stage':<12}{'rows in':>10}{'rows out':>10}{'seconds':>9}")
        for st in stages:
            print(f"    {st['stage']:<12}{st['rows_in']:>10,}{st['rows_out']:>10,}{st['seconds']:>9.2f}")
        summary["prepare"]["stages"] = {st["stage"]: {"rows_in": st["rows_in"], "rows_out": st["rows_out"],
                                                      "seconds": st["seconds"]} for st in stages}
        summary["prepare"]["rejected_by_reason"] = p["manifest"]["counts"]["rejected_by_reason"]
        share = p["rows_kept"] / p["rows_in"]
        summary["kept_share"] = round(share, 5)
        print(f"prepare kept {p['rows_kept']:,} of {p['rows_in']:,} rows ({share:.2%}); the corpus was built to keep "
              f"{keep / rows:.2%} (allowed: {KEPT_TOLERANCE:.1%} of the rows below, {KEPT_EXCESS:.0%} above)")
        if share < keep / rows - KEPT_TOLERANCE:
            failures.append(f"prepare kept {share:.2%} of the rows, below the {keep / rows:.2%} the corpus was built to keep")
        if share > keep / rows + KEPT_EXCESS:
            failures.append(f"prepare kept {share:.2%} of the rows, far above the {keep / rows:.2%} the corpus was "
                            "built to keep: duplicates were not removed")
    if len(results) == 2:
        ratio = results["prepare"]["rows_per_s"] / results["baseline"]["rows_per_s"]
        summary["speedup"] = round(ratio, 2)
        print(f"prepare / seed loader: {ratio:.2f}x the rows/s")
        cpu_ratio = results["baseline"]["cpu_seconds"] / results["prepare"]["cpu_seconds"]
        summary["cpu_ratio"] = round(cpu_ratio, 2)
        print(f"CPU seconds (process tree): prepare {results['prepare']['cpu_seconds']:.1f}, seed loader "
              f"{results['baseline']['cpu_seconds']:.1f}: prepare does {cpu_ratio:.2f}x the rows per CPU second")
        if ratio < 1:
            failures.append(f"prepare is slower than the seed loader ({ratio:.2f}x)")
    summary["ok"] = not failures
    summary["figures"] = _figures(rows, keep, results)
    for f in failures:
        print(f"FAIL: {f}")
    print(json.dumps(summary, ensure_ascii=False))
    return 1 if failures else 0


def _figures(rows: int, keep: int, results: dict) -> list[dict]:
    """The figures for bench/run_all.py: name, value, unit, baseline (same run) and ratio."""
    p, b = results.get("prepare"), results.get("baseline")
    figures = []
    if p is not None:
        speed = {"name": f"data prepare throughput ({rows:,}-row GB18030 corpus)", "value": round(p["rows_per_s"]),
                 "unit": "rows/s", "baseline": None, "ratio": None, "goal": ">= 3x the seed loader"}
        memory = {"name": "data prepare peak memory (process tree RSS)", "value": round(p["peak_rss_mb"]),
                  "unit": "MB", "baseline": None, "ratio": None, "goal": "< 3000 MB"}
        if b is not None:
            speed.update(baseline=round(b["rows_per_s"]), ratio=round(p["rows_per_s"] / b["rows_per_s"], 2))
            memory.update(baseline=round(b["peak_rss_mb"]), ratio=round(p["peak_rss_mb"] / b["peak_rss_mb"], 2))
        figures += [speed, memory,
                    {"name": "data prepare share of rows kept", "value": round(p["rows_kept"] / p["rows_in"], 4),
                     "unit": "share", "baseline": round(keep / rows, 4),
                     "ratio": round(p["rows_kept"] / p["rows_in"] / (keep / rows), 3)}]
    elif b is not None:
        figures.append({"name": f"seed loader throughput ({rows:,}-row GB18030 corpus)", "value": round(b["rows_per_s"]),
                        "unit": "rows/s", "baseline": None, "ratio": None})
    return figures


if __name__ == "__main__":
    sys.exit(main())

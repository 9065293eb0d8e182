"""What fresh memory costs on this machine, and the two ways `medtune data prepare` avoids the dear kind.

    python bench/fresh_memory.py            # ~1 minute; prints a table and a JSON line with the figures

On virtual machines whose kernel hands free memory back to the hypervisor (free page reporting), a free
2 MB block left alone for a couple of seconds goes back to the host; the next program to use it waits
while the host supplies it again. Two things in `prepare` asked for such blocks:

* transparent huge pages: numpy (arrays from 4 MB) and Arrow's mimalloc ask for them, and each is a 2 MB
  block — `load.without_huge_pages` turns them off while `prepare` runs;
* large writes: the page cache sizes its folios to the write, so a 2 MB+ write() takes 2 MB blocks —
  `load.SmallWrites` hands Arrow's writers' buffers to the OS 1 MB at a time.

Each case runs after a pause (the pipeline's memory is freed and reused seconds apart), alternating
with the other, and the mean of the rounds is printed. On a machine without free page reporting both
ways cost about the same; the ratio says which kind of machine this is.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from medtune.data.load import SmallWrites, without_huge_pages  # noqa: E402

PAUSE = 4.0  # seconds: long enough for freed blocks to be handed back where the kernel does that
ROUNDS = 3
GB = 1 << 30


def touch_fresh(huge_pages: bool) -> float:
    """Seconds to fill 1 GB of new numpy memory (numpy asks for huge pages unless they are turned off)."""
    time.sleep(PAUSE)
    if huge_pages:
        start = time.perf_counter()
        a = np.empty(GB, dtype=np.uint8)
        a.fill(1)
        return time.perf_counter() - start
    with without_huge_pages():
        start = time.perf_counter()
        a = np.empty(GB, dtype=np.uint8)
        a.fill(1)
        return time.perf_counter() - start


def write_ipc(folder: Path, small: bool) -> float:
    """Seconds to write ~1 GB of Arrow IPC batches (each string column's data one ~9 MB buffer)."""
    column = pa.array(["中文医疗问答，头痛发热咳嗽" * 25] * 12_000)
    table = pa.table({"question": column, "answer": column})
    rounds = GB // table.nbytes + 1
    path = folder / "fresh_memory.arrow"
    time.sleep(PAUSE)
    start = time.perf_counter()
    sink = SmallWrites(path) if small else str(path)
    with pa.ipc.new_file(sink, table.schema) as writer:
        for _ in range(rounds):
            writer.write_table(table)
    if small:
        sink.close()
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def main() -> None:
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    times: dict[str, list[float]] = {k: [] for k in ("huge", "plain", "large_writes", "small_writes")}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for _ in range(ROUNDS):
            times["huge"].append(touch_fresh(True))
            times["plain"].append(touch_fresh(False))
            times["large_writes"].append(write_ipc(Path(tmp), small=False))
            times["small_writes"].append(write_ipc(Path(tmp), small=True))
    mean = {k: statistics.mean(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:13} " + "  ".join(f"{x:6.2f} s" for x in v) + f"   mean {mean[k]:.2f} s")
    figures = [
        {"name": "fill 1 GB of new numpy memory, huge pages off (prepare's way) vs numpy's default",
         "value": round(mean["plain"], 3), "unit": "s", "baseline": round(mean["huge"], 3),
         "ratio": round(mean["plain"] / mean["huge"], 3)},
        {"name": "write 1 GB of Arrow IPC in 1 MB writes (prepare's way) vs one write per buffer",
         "value": round(mean["small_writes"], 3), "unit": "s", "baseline": round(mean["large_writes"], 3),
         "ratio": round(mean["small_writes"] / mean["large_writes"], 3)},
    ]
    print(json.dumps({"bench": "fresh_memory", "pause_s": PAUSE, "rounds": ROUNDS,
                      "times": times, "figures": figures}))


if __name__ == "__main__":
    if not sys.platform.startswith("linux"):
        print("fresh_memory: skipped: measures Linux memory behaviour")
        sys.exit(77)
    main()

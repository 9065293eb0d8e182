"""Load test of `medtune serve` (HF engine): 1, 4 and 8 concurrent streaming clients against one server.

    python bench/serve_load.py                          # tiny model, 64 tokens a request
    python bench/serve_load.py --max-tokens 128 --requests-per-client 4
    python bench/serve_load.py --model models/Qwen/Qwen3-4B --adapter runs/lora-med   # a real model (GPU)

Starts `medtune serve` on a free loopback port in a subprocess (the tiny random Qwen3 is built into
bench/out/serve_load/ on first use), waits for /health, warms up, then for each concurrency level runs
that many client threads, each sending ``--requests-per-client`` streamed requests one after another.
Every request asks for exactly ``--max-tokens`` tokens with end-of-sequence ignored (the ``ignore_eos``
extension field: a random model would otherwise stop at random). Prints requests/s, generated tokens/s,
p50/p95 latency and time to first token per level, and the ratio of 8-concurrent to sequential
throughput (goal: >= 3x on the tiny model on 2 CPU cores). The last line is the JSON object whose
``figures`` bench/run_all.py collects. Only loopback is ever contacted; every loop is bounded.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "serve_load"
SAMPLE = ROOT.parent / "shared" / "data" / "toyhom_neike_sample.csv"
QUESTIONS = ["最近总是头晕乏力，怎么办？", "咳嗽两周了，晚上更严重，需要做什么检查？", "高血压患者平时饮食要注意什么？",
             "胃疼三天了，吃什么药好？", "孩子反复湿疹怎么护理？", "失眠多梦，白天没精神，怎么调理？",
             "体检发现尿酸偏高，要紧吗？", "腰疼了好几天，弯腰更疼，是腰椎间盘突出吗？"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model() -> Path:
    path = OUT / "tiny-qwen3"
    if not (path / "model.safetensors").is_file():
        if not SAMPLE.is_file():
            sys.exit(f"serve_load: the shared sample {SAMPLE} is missing (needed to build the tiny model)")
        from medtune.modeling import build_tiny_model

        build_tiny_model(path, data=SAMPLE)
    return path


def start_server(args: argparse.Namespace, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "medtune", "serve", "--model", str(args.model), "--port", str(port),
           "--batch-size", str(args.batch_size), "--max-queue", "256", "--profile", args.profile]
    for adapter in args.adapter:
        cmd += ["--adapter", adapter]
    log = open(log_path, "w", encoding="utf-8")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"serve_load: the server exited with {server.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    sys.exit(f"serve_load: the server did not come up in {args.start_timeout:.0f} s; see {log_path}")


def one_request(client: httpx.Client, url: str, question: str, max_tokens: int) -> dict:
    """One streamed request: latency, time to first text, tokens generated."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "department": "内科"}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with client.stream("POST", url, json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content") \
                    and chunk["choices"][0]["delta"].get("role") is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": ttft if ttft is not None else latency, "tokens": tokens}


def run_level(url: str, concurrency: int, per_client: int, max_tokens: int) -> dict:
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        with httpx.Client() as client:
            for i in range(per_client):
                try:
                    res = one_request(client, url, QUESTIONS[(k + i) % len(QUESTIONS)], max_tokens)
                except httpx.HTTPError as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    results.append(res)

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        sys.exit(f"serve_load: {len(errors)} requests failed at concurrency {concurrency}: {errors[0]}")
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    if any(r["tokens"] != max_tokens for r in results):
        sys.exit(f"serve_load: a request generated other than {max_tokens} tokens despite ignore_eos")

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall, "rps": len(results) / wall,
            "tokens_per_s": tokens / wall, "p50": statistics.median(latencies), "p95": pct(latencies, 0.95),
            "ttft_p50": statistics.median(ttfts), "ttft_p95": pct(ttfts, 0.95)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the tiny model)")
    parser.add_argument("--adapter", action="append", default=[], help="adapter directory (repeatable)")
    parser.add_argument("--profile", default="cpu", help="hardware profile passed to medtune serve")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--levels", default="1,4,8", help="concurrency levels, comma-separated")
    parser.add_argument("--batch-size", type=int, default=8, help="the server's batch (--batch-size)")
    parser.add_argument("--start-timeout", type=float, default=300)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    args.model = args.model or tiny_model()
    levels = [int(x) for x in args.levels.split(",")]
    port = free_port()
    server = start_server(args, port, OUT / "server.log")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        with httpx.Client() as client:  # warm-up: first calls pay for lazy initialisation
            for q in QUESTIONS[:2]:
                one_request(client, url, q, 8)
        rows = [run_level(url, c, args.requests_per_client, args.max_tokens) for c in levels]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"medtune serve, HF engine: {args.model.name}, {args.max_tokens} tokens per request (EOS ignored), "
          f"{args.requests_per_client} requests per client, batch {args.batch_size}, {os.cpu_count()} CPUs")
    print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} {'TTFT p50':>9} {'TTFT p95':>9}")
    for r in rows:
        print(f"{r['concurrency']:>7} {r['requests']:>8} {r['rps']:>7.2f} {r['tokens_per_s']:>8.1f} {r['p50']:>7.2f} "
              f"{r['p95']:>7.2f} {r['ttft_p50']:>9.3f} {r['ttft_p95']:>9.3f}")
    base = next((r for r in rows if r["concurrency"] == 1), rows[0])
    figures = []
    for r in rows:
        c = r["concurrency"]
        figures.append({"name": f"serve {c} client{'s' * (c > 1)}: generated tokens/s", "value": round(r["tokens_per_s"], 1),
                        "unit": "tok/s", "baseline": round(base["tokens_per_s"], 1),
                        "ratio": round(r["tokens_per_s"] / base["tokens_per_s"], 2),
                        **({"goal": ">= 3x"} if c == 8 else {})})
        figures.append({"name": f"serve {c} client{'s' * (c > 1)}: p50 latency", "value": round(r["p50"], 3), "unit": "s"})
        figures.append({"name": f"serve {c} client{'s' * (c > 1)}: p50 time to first token", "value": round(r["ttft_p50"], 3),
                        "unit": "s"})
    top = max(rows, key=lambda r: r["concurrency"])
    ratio = top["tokens_per_s"] / base["tokens_per_s"]
    print(f"throughput at {top['concurrency']} concurrent clients / {base['concurrency']} client(s): {ratio:.2f}x "
          "(goal for 8 / 1: >= 3x)")
    print(json.dumps({"figures": figures}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

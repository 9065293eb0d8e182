"""`medtune chat` through a subprocess with stdin: /reset, /exit, history trimmed to the context window,
bad lines, and Ctrl-C stopping an answer but not the session."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

QUESTION = "高血压患者平时饮食要注意什么？能吃党参吗？我今年六十岁了，血压一直控制得不太好。"
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "MEDTUNE_OFFLINE": "1"}


def chat_argv(tiny_model_dir: Path, adapter: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medtune", "chat", "--model", str(tiny_model_dir), "--adapter", str(adapter),
            "--profile", "cpu", "--department", "心血管科", *extra]


@pytest.mark.slow
def test_reset_exit_trimming_and_bad_lines(tiny_model_dir: Path, trained_adapter_dir: Path):
    from transformers import AutoTokenizer

    from medtune.chat_format import build_messages, render_prompt

    tokenizer = AutoTokenizer.from_pretrained(trained_adapter_dir)
    alone = len(tokenizer(render_prompt(tokenizer, build_messages(QUESTION, department="心血管科")),
                          add_special_tokens=False)["input_ids"])
    max_new = 16
    window = alone + max_new + 8  # one question fits; with the previous turn in front of it, it does not
    stdin = (f"{QUESTION}\n{QUESTION}\n\n" + QUESTION * 10 + "\n").encode() + b"\xff\xfe\x01\x02\n" \
        + f"/reset\n{QUESTION}\n/exit\n".encode()
    proc = subprocess.run(chat_argv(tiny_model_dir, trained_adapter_dir, "--greedy", "--max-new-tokens", str(max_new),
                                    "--context-window", str(window)),
                          input=stdin, capture_output=True, timeout=600, env=ENV)
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert out.count("医生：") == 3  # Q1, Q2 (history trimmed), Q after /reset; the long and binary lines refused
    assert "已省略最早的 1 轮" in out
    assert "（对话已清空）" in out
    assert "too long" in err and "not readable text" in err
    answers = [part.split("\n\n你：")[0] for part in out.split("医生：")[1:]]
    # greedy: the first question, the trimmed second and the one after /reset see the same prompt
    assert answers[0] == answers[1] == answers[2]


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_not_the_session(tiny_model_dir: Path, trained_adapter_dir: Path):
    # A random tiny model seldom emits its end-of-turn token: the answer runs until interrupted.
    proc = subprocess.Popen(chat_argv(tiny_model_dir, trained_adapter_dir, "--max-new-tokens", "4000", "--seed", "0"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        proc.stdin.write(f"{QUESTION}\n".encode())
        proc.stdin.flush()
        seen, deadline = b"", time.monotonic() + 300
        while "医生：".encode() not in seen and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                seen += os.read(proc.stdout.fileno(), 4096)
        assert "医生：".encode() in seen, "the answer never started"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate("/exit\n".encode(), timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (seen + out).decode("utf-8", "replace")
    err = err.decode("utf-8", "replace")
    assert proc.returncode == 0, err[-3000:]
    assert "（已停止回答）" in out and "Traceback" not in err
    assert out.rstrip().endswith("你：")  # back at the prompt, then /exit

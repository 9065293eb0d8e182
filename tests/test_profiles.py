"""The hardware profile table and its detection."""
from __future__ import annotations

import dataclasses

import pytest

from medtune.errors import MedtuneError
from medtune.profiles import (
    PROFILE_NAMES,
    PROFILES,
    apply_quant_override,
    choose_precision,
    detect_profile,
    format_table,
    get_profile,
    profile_for_memory,
)


def test_table_has_every_profile_the_issue_names():
    assert PROFILE_NAMES == ("cpu", "cuda-8gb", "cuda-12gb", "cuda-16gb", "cuda-24gb", "cuda-40gb+", "multi-gpu")
    for name, p in PROFILES.items():
        assert p.name == name
        assert p.quant in ("none", "int8", "nf4") and p.infer_quant in ("none", "int8", "nf4")
        assert p.precision in ("fp32", "bf16", "fp16") and p.infer_dtype in ("fp32", "bf16", "fp16")
        assert p.micro_batch >= 1 and p.grad_accum >= 1 and p.max_seq_len >= 512 and p.infer_batch_size >= 1


def test_single_device_rows_keep_the_seeds_effective_batch():
    assert {p.name: p.effective_batch for p in PROFILES.values() if p.name != "multi-gpu"} == {
        name: 8 for name in PROFILE_NAMES if name != "multi-gpu"}
    seed_gpu = get_profile("cuda-24gb")
    assert (seed_gpu.micro_batch, seed_gpu.grad_accum, seed_gpu.max_seq_len) == (2, 4, 2048)


def test_small_gpus_quantise_and_big_ones_do_not():
    assert get_profile("cuda-8gb").quant == "nf4" and get_profile("cuda-8gb").infer_quant == "nf4"
    assert get_profile("cuda-12gb").quant == "nf4"
    for name in ("cuda-16gb", "cuda-24gb", "cuda-40gb+", "multi-gpu"):
        assert get_profile(name).quant == "none" and get_profile(name).precision == "bf16"
    assert get_profile("cpu").precision == "fp32" and get_profile("cpu").quant == "none"
    # Memory thresholds grow with the profiles.
    minimums = [PROFILES[n].min_gpu_memory_gib for n in PROFILE_NAMES if n.startswith("cuda-")]
    assert minimums == sorted(minimums)


def test_profile_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_profile("cpu").micro_batch = 3  # type: ignore[misc]


def test_unknown_profile_lists_the_names():
    with pytest.raises(MedtuneError) as e:
        get_profile("cuda-6gb")
    assert "cuda-6gb" in str(e.value) and all(name in str(e.value) for name in PROFILE_NAMES)


def test_quant_override():
    p = get_profile("cuda-24gb")
    assert apply_quant_override(p, None) is p
    q = apply_quant_override(p, "nf4")
    assert (q.quant, q.infer_quant, q.micro_batch) == ("nf4", "nf4", p.micro_batch)
    assert p.quant == "none"  # the table itself is untouched
    with pytest.raises(MedtuneError, match="--quant 'int4'"):
        apply_quant_override(p, "int4")


@pytest.mark.parametrize("gib, gpus, expected", [
    (0, 0, "cpu"), (5.8, 1, "cpu"), (7.6, 1, "cuda-8gb"), (11.6, 1, "cuda-12gb"), (14.7, 1, "cuda-16gb"),
    (15.6, 1, "cuda-16gb"), (23.5, 1, "cuda-24gb"), (39.4, 1, "cuda-40gb+"), (79.2, 1, "cuda-40gb+"),
    (23.5, 4, "multi-gpu"),
])
def test_profile_for_memory(gib: float, gpus: int, expected: str):
    assert profile_for_memory(gib, gpus) == expected


def test_detect_on_this_cpu_machine():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert detect_profile() == "cpu"
    assert choose_precision("bf16") == "fp32" and choose_precision("fp32") == "fp32"


def test_detect_reads_gpu_count_and_free_memory(monkeypatch: pytest.MonkeyPatch):
    import torch

    asked: list[int] = []
    state = {"n": 1, "free": 23.2 * 2**30}

    def mem_get_info(device: int) -> tuple[int, int]:
        asked.append(device)
        return int(state["free"]), int(24 * 2**30)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["n"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert detect_profile() == "cuda-24gb"
    state["free"] = 9 * 2**30  # another process holds most of the card: free memory decides
    assert detect_profile() == "cuda-8gb"
    state["n"] = 2
    assert detect_profile() == "multi-gpu"
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun only this rank's GPU is asked
    detect_profile()
    assert asked[-1] == 1 and set(asked[:-1]) == {0}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_precision("bf16") == "fp16"


def test_format_table_lists_every_profile():
    lines = format_table().splitlines()
    assert lines[0].split()[0] == "profile" and [line.split()[0] for line in lines[1:]] == list(PROFILE_NAMES)
    assert "2x4" in next(line for line in lines if line.startswith("cuda-24gb"))

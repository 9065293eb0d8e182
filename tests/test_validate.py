"""`medtune validate` and the shipped recipes: every config under configs/ validates; problems are all
reported, each with its file and key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medtune.cli import main, parse
from medtune.errors import MedtuneError
from medtune.validate import check_file, validate

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
RECIPES = [p for p in SHIPPED if "accelerate" not in p.parts]


def test_the_issue_s_recipes_are_shipped():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in SHIPPED}
    assert {"qwen3-4b/qlora-8gb.yaml", "qwen3-4b/lora-24gb.yaml", "qwen3-0.6b/lora-cpu.yaml", "tiny/lora-cpu.yaml",
            "accelerate/deepspeed-zero2.yaml", "accelerate/deepspeed-zero3.yaml", "accelerate/fsdp.yaml",
            "accelerate/ddp.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_shipped_config_validates(path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)  # the opening comments give paths from the repository root
    kind, problems = check_file(path.relative_to(ROOT))
    assert problems == [], problems
    assert kind == ("accelerate config" if "accelerate" in path.parts else "train recipe")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_recipes_run_through_the_real_cli_and_flags_override_them(path: Path):
    command, kwargs = parse(["train", "--config", str(path), "--max-steps", "7"])
    assert command == "train" and kwargs["train"].max_steps == 7
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first == f"# medtune train --config {path.relative_to(ROOT).as_posix()}" or first.startswith(
        f"# medtune train --config {path.relative_to(ROOT).as_posix()} ")


def test_validating_recipes_imports_no_torch():
    code = ("import sys; from pathlib import Path; from medtune.validate import validate; "
            "validate([Path('configs/qwen3-4b'), Path('configs/tiny'), Path('configs/qwen3-0.6b')]); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, timeout=120)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_two_bad_fields_are_both_reported_with_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture):
    recipe = _write(tmp_path / "bad.yaml", f"# medtune train --config {tmp_path / 'bad.yaml'}\n"
                    "model:\n  model: models/tiny\ndata: d\noutput: o\ntrain:\n  lr: fast\n  lora_rank: 8\n")
    with pytest.raises(MedtuneError) as e:
        validate([recipe])
    msg = str(e.value)
    assert f"{recipe}: train.lr: expected a number, got 'fast'" in msg
    assert f"{recipe}: train.lora_rank: unknown key (did you mean 'lora_r'?)" in msg
    assert "2 problems in 1 of 1 files" in msg
    assert capsys.readouterr().out.startswith(f"FAIL {recipe}")


def test_recipe_checks_beyond_types(tmp_path: Path):
    path = tmp_path / "r.yaml"
    head = f"# medtune train --config {path}\n"
    _write(path, head + "model:\n  model: Qwen/Qwen3-4B\n  profile: cuda-8g\ndata: d\noutput: o\n")
    assert check_file(path)[1] == ["model.profile: unknown profile 'cuda-8g' (did you mean 'cuda-8gb'?); choose one of "
                                   "cpu, cuda-8gb, cuda-12gb, cuda-16gb, cuda-24gb, cuda-40gb+, multi-gpu"]
    _write(path, head + "model:\n  model: Qwen/Qwen3-4B\n  profile: cuda-8gb\ndata: d\noutput: o\n"
                        "train:\n  target_modules: [q_proj, vproj]\n")
    assert check_file(path)[1] == ["train.target_modules: 'vproj' is no projection of this model (did you mean 'v_proj'?)"]
    # The 24 GB recipe's settings on the 8 GB profile: refused, with what would fit.
    _write(path, head + "model:\n  model: Qwen/Qwen3-4B\n  profile: cuda-8gb\n  quant: none\ndata: d\noutput: o\n"
                        "train:\n  micro_batch: 2\n  max_seq_len: 2048\n")
    (problem,) = check_file(path)[1]
    assert problem.startswith("train: the cuda-8gb plan needs about 16.") and "these would fit: --quant nf4" in problem


def test_opening_comment_must_run_this_file(tmp_path: Path):
    path = _write(tmp_path / "r.yaml", "model:\n  model: models/tiny\ndata: d\noutput: o\n")
    assert check_file(path)[1] == [f"(opening comment): say how to run this file, e.g. '# medtune train --config "
                                   f"{path.as_posix()}'"]
    _write(path, "# medtune train --config other.yaml\nmodel:\n  model: models/tiny\ndata: d\noutput: o\n")
    assert check_file(path)[1] == [f"(opening comment): the command should read this file: --config {path.as_posix()}"]


def test_bad_accelerate_config_reports_every_problem(tmp_path: Path):
    path = _write(tmp_path / "a.yaml", f"# accelerate launch --config_file {tmp_path / 'a.yaml'} -m medtune.cli train "
                  "--config configs/tiny/lora-cpu.yaml\ndistributed_type: DEEPSPEED\nmixed_precision: bf17\n"
                  "num_process: 2\ndeepspeed_config:\n  zero_stag: 2\n  offload_optimizer_device: gpu\n")
    kind, problems = check_file(path)
    assert kind == "accelerate config"
    assert problems == ["mixed_precision: 'bf17' is not one of no, fp16, bf16, fp8",
                        "num_process: unknown key (did you mean 'num_processes'?)",
                        "deepspeed_config.zero_stag: unknown key (did you mean 'zero_stage'?)",
                        "deepspeed_config.offload_optimizer_device: 'gpu' is not one of none, cpu, nvme"]
    _write(path, f"# accelerate launch --config_file {path} -m medtune.cli train --config nowhere.yaml\n"
                 "distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategy: HALF_SHARD\n  fsdp_use_orig_params: maybe\n")
    assert check_file(path)[1] == [
        "(opening comment): the recipe nowhere.yaml it launches does not exist",
        "fsdp_config.fsdp_sharding_strategy: 'HALF_SHARD' is not one of FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, "
        "HYBRID_SHARD, HYBRID_SHARD_ZERO2",
        "fsdp_config.fsdp_use_orig_params: expected true or false, got 'maybe'"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    assert parse(["validate", "--file", "configs", "--file", "configs/tiny/lora-cpu.yaml"]) == (
        "validate", {"file": [Path("configs"), Path("configs/tiny/lora-cpu.yaml")]})
    assert main(["validate", "--file", "configs/qwen3-4b"]) == 0
    assert capsys.readouterr().out.count("ok   configs/qwen3-4b/") == len(list((ROOT / "configs/qwen3-4b").glob("*.yaml")))
    assert main(["validate", "--file", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def _commands_in_opening_comment(path: Path) -> list[list[str]]:
    """Each ``medtune ...`` (or ``-m medtune.cli ...``) command of a file's opening comment, as argv."""
    import re
    import shlex

    from medtune.validate import opening_comment

    found = []
    for line in opening_comment(path.read_text(encoding="utf-8")).splitlines():
        m = re.search(r"(?:^|\s)(?:medtune|-m medtune\.cli)\s+(.*)$", line)
        if m:
            argv = shlex.split(m.group(1).split("  (")[0])
            found.append(argv)
    return found


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_command_in_the_opening_comments_parses(path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    commands = _commands_in_opening_comment(path)
    assert commands, "no medtune command in the opening comment"
    for argv in commands:
        command, _ = parse(argv)
        assert command in ("train", "data prepare", "tiny-model"), argv

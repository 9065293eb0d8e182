"""`medtune validate`: check recipes and launcher configs without running anything.

    medtune validate --file configs                    # every .yaml/.yml/.json under configs/
    medtune validate --file configs/qwen3-4b/qlora-8gb.yaml --file configs/accelerate/fsdp.yaml

Every file must open with a comment giving the command that runs it (``medtune train --config FILE`` or
``accelerate launch --config_file FILE ...``). What is checked:

- a medtune recipe: its keys and values against the signature of the command its opening comment names
  (``train`` when it names none), exactly as ``--config`` would read it — unknown keys with a
  did-you-mean, bad values, all at once; then, for ``train``, that the profile exists, the LoRA targets
  are projections of the model, and the estimated peak memory (`medtune.memory`) fits the profile's GPU;
- an accelerate config (it has ``distributed_type``): top-level keys and values against accelerate's own
  `ClusterConfig` dataclass and enums, ``deepspeed_config`` / ``fsdp_config`` keys against the options of
  ``accelerate launch`` they become, and their values against accelerate's choices.

Reading a recipe imports no torch; an accelerate config imports accelerate (which imports torch).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
from pathlib import Path
from typing import Any

from medtune.config import ConfigError, resolve
from medtune.errors import MedtuneError

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
_MEDTUNE_COMMAND = re.compile(r"\bmedtune(?:\.cli)?\s+((?:[a-z][\w-]*)(?:\s+[a-z][\w-]*)?)")
_OPTION = {"--config": re.compile(r"--config[= ](\S+)"), "--config_file": re.compile(r"--config_file[= ](\S+)")}


def validate(file: list[Path]) -> int:
    """`medtune validate`: check each recipe or accelerate config (a directory: every config under it)
    without running anything; prints one line per file and raises with every problem, each named by
    file and key.

    Args:
        file: a recipe, an accelerate config, or a directory of them; repeat the flag (or give them as
            plain words: `medtune validate configs`)
    """
    paths = expand(file)
    failed: list[str] = []
    for path in paths:
        kind, problems = check_file(path)
        if problems:
            failed.extend(f"{path}: {p}" for p in problems)
            print(f"FAIL {path} ({kind}): {len(problems)} problem{'s' if len(problems) > 1 else ''}")
        else:
            print(f"ok   {path} ({kind})")
    if failed:
        raise MedtuneError(f"{len(failed)} problem{'s' if len(failed) > 1 else ''} in "
                           f"{len({f.split(': ')[0] for f in failed})} of {len(paths)} files:\n"
                           + "\n".join(f"  - {f}" for f in failed))
    return 0


def expand(files: list[Path]) -> list[Path]:
    """Files as given; directories replaced by the config files under them (sorted)."""
    paths: list[Path] = []
    for f in map(Path, files):
        if f.is_dir():
            found = sorted(p for p in f.rglob("*") if p.suffix in SUFFIXES and p.is_file())
            if not found:
                raise MedtuneError(f"--file {f}: no {', '.join(SUFFIXES)} files in this directory")
            paths.extend(found)
        elif f.is_file():
            paths.append(f)
        else:
            raise MedtuneError(f"--file {f}: no such file or directory")
    return paths


def check_file(path: Path) -> tuple[str, list[str]]:
    """(what the file is, its problems): ``'train recipe'``, ``'accelerate config'``..."""
    import yaml

    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        return "unreadable", [f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}"]
    if not isinstance(data, dict):
        return "unreadable", ["the top level must be a mapping of option: value"]
    comment = opening_comment(text)
    if "distributed_type" in data or "compute_environment" in data:
        return "accelerate config", check_launch_comment(path, comment) + check_accelerate(data)
    command, problems = recipe_command(path, comment)
    return f"{command} recipe", problems + check_recipe(path, command)


def opening_comment(text: str) -> str:
    """The comment lines the file opens with (``#`` stripped, joined by newlines; blank lines skipped)."""
    lines = []
    for line in filter(str.strip, text.splitlines()):
        if not line.lstrip().startswith("#"):
            break
        lines.append(line.lstrip()[1:].strip())
    return "\n".join(lines)


def _names_this_file(path: Path, named: str) -> bool:
    """``named`` (as a command line gives it, relative to wherever it runs) ends with this file's path."""
    parts = tuple(p for p in Path(named).parts if p not in (".", ".."))
    return bool(parts) and path.resolve().parts[-len(parts):] == parts


def recipe_command(path: Path, comment: str) -> tuple[str, list[str]]:
    """The medtune command the opening comment runs this recipe with, and the comment's problems."""
    match = _MEDTUNE_COMMAND.search(comment)
    if not match:
        return "train", ["(opening comment): say how to run this file, e.g. "
                         f"'# medtune train --config {path.as_posix()}'"]
    from medtune.cli import COMMANDS

    words = match.group(1).split()
    command = " ".join(words) if " ".join(words) in COMMANDS else words[0]
    problems = []
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        problems.append(f"(opening comment): 'medtune {command}' is no medtune command"
                        + (f" (did you mean {close[0]!r}?)" if close else ""))
        command = "train"
    named = _OPTION["--config"].search(comment)
    if not named or not _names_this_file(path, named.group(1)):
        problems.append(f"(opening comment): the command should read this file: --config {path.as_posix()}")
    return command, problems


def check_launch_comment(path: Path, comment: str) -> list[str]:
    """An accelerate config's comment must launch with it, and the recipe it names must exist."""
    named = _OPTION["--config_file"].search(comment)
    if "accelerate launch" not in comment or not named:
        return [f"(opening comment): say how to run this file, e.g. '# accelerate launch --config_file "
                f"{path.as_posix()} -m medtune.cli train --config RECIPE'"]
    problems = []
    if not _names_this_file(path, named.group(1)):
        problems.append(f"(opening comment): --config_file {named.group(1)} is not this file")
    recipe = _OPTION["--config"].search(comment)
    if recipe and not any((base / recipe.group(1)).is_file() for base in (Path.cwd(), *path.resolve().parents)):
        problems.append(f"(opening comment): the recipe {recipe.group(1)} it launches does not exist")
    return problems


# ----------------------------------------------------------------------------- medtune recipes

def check_recipe(path: Path, command: str) -> list[str]:
    """Problems of a recipe for ``command``: as ``--config`` reads it, then train's own checks."""
    from medtune.cli import load_function

    fn = load_function(command)
    try:
        kwargs = resolve(fn, {}, path)
    except ConfigError as e:
        return [p.removeprefix(f"{path}: ") for p in e.problems]
    return check_train(kwargs) if command == "train" else []


def check_train(kwargs: dict[str, Any]) -> list[str]:
    """A train recipe's profile exists, its LoRA targets are the model's, and its plan fits the
    profile's GPU (estimated; the CUDA context included)."""
    from medtune import memory
    from medtune.profiles import PROFILE_NAMES, PROFILES
    from medtune.train import memory_setting, plan_for_profile

    model, args = kwargs["model"], kwargs["train"]
    if model.profile is not None and model.profile not in PROFILE_NAMES:
        close = difflib.get_close_matches(model.profile, PROFILE_NAMES, n=1)
        return [f"model.profile: unknown profile {model.profile!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; choose one of {', '.join(PROFILE_NAMES)}"]
    shape = memory.read_shape(model.model, model.models_dir)
    if shape is None:
        return []
    linears = shape.linear_shapes()
    problems = [f"train.target_modules: {t!r} is no projection of this model"
                + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(t, list(linears), n=1)) else "")
                for t in args.target_modules if t not in linears]
    if problems or model.profile in (None, "cpu"):
        return problems  # a CPU plan depends on the machine's RAM: `medtune train` checks it there
    profile = PROFILES[model.profile]
    plan = plan_for_profile(model.profile, model, args, for_this_machine=False)
    need = memory.estimate(shape, memory_setting(plan, args))
    budget = int(profile.min_gpu_memory_gib * memory.GIB) - memory.CUDA_CONTEXT_BYTES
    if need.peak > budget:
        others = {n: memory_setting(plan_for_profile(n, dataclasses.replace(model, profile=n), args,
                                                     for_this_machine=False), args)
                  for n in reversed(PROFILE_NAMES) if n.startswith("cuda-")}
        return ["train: " + memory.refusal(shape, model.profile, memory_setting(plan, args), budget,
                                           f"the smallest GPU of the {model.profile} profile", others)]
    return []


# ----------------------------------------------------------------------------- accelerate configs

def check_accelerate(data: dict[str, Any]) -> list[str]:
    """Problems of an accelerate config file, against accelerate's `ClusterConfig` and launch options."""
    import typing

    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import ComputeEnvironment, DistributedType

    from medtune.config import coerce

    problems: list[str] = []
    fields = {f.name: f for f in dataclasses.fields(ClusterConfig)}
    legacy = {"fp16", "dynamo_backend"}  # BaseConfig.process_config still converts these
    hints = typing.get_type_hints(ClusterConfig)
    enums = {"compute_environment": ComputeEnvironment, "distributed_type": DistributedType}
    if "distributed_type" not in data:
        problems.append("distributed_type: required (NO, MULTI_GPU, MULTI_CPU, DEEPSPEED, FSDP, ...)")
    for key, value in data.items():
        if key in legacy:
            continue
        if key not in fields:
            problems.append(_unknown(key, list(fields)))
        elif key in enums:
            choices = [e.value for e in enums[key]]
            if value not in choices:
                problems.append(f"{key}: {value!r} is not one of {', '.join(choices)}")
        elif key == "mixed_precision":
            if value not in ("no", "fp16", "bf16", "fp8"):
                problems.append(f"{key}: {value!r} is not one of no, fp16, bf16, fp8")
        elif key in ("deepspeed_config", "fsdp_config"):
            if not isinstance(value, dict):
                problems.append(f"{key}: expected a mapping")
            else:
                problems.extend(_check_launch_options(key, value))
        elif value is not None and hints.get(key) in (int, bool, str, typing.Optional[int], typing.Optional[str],
                                                      typing.Optional[bool]):
            try:
                coerce(value, hints[key], key)
            except ValueError as e:
                problems.append(str(e))
    kind = data.get("distributed_type")
    if kind == "DEEPSPEED" and not data.get("deepspeed_config"):
        problems.append("deepspeed_config: required with distributed_type DEEPSPEED")
    if kind == "FSDP" and not data.get("fsdp_config"):
        problems.append("fsdp_config: required with distributed_type FSDP")
    if isinstance(data.get("num_processes"), int) and data["num_processes"] < 1:
        problems.append(f"num_processes: must be at least 1, got {data['num_processes']}")
    return problems


def _launch_choices() -> dict[str, tuple[Any, list[str] | None]]:
    """``accelerate launch`` option -> (its type, its choices), with accelerate's FSDP/DeepSpeed choices."""
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import constants

    options = {a.dest: (a.type, list(a.choices) if a.choices else None) for a in launch_command_parser()._actions}
    known = {"fsdp_sharding_strategy": constants.FSDP_SHARDING_STRATEGY,
             "fsdp_auto_wrap_policy": constants.FSDP_AUTO_WRAP_POLICY,
             "fsdp_backward_prefetch": constants.FSDP_BACKWARD_PREFETCH + ["NO_PREFETCH"],
             "fsdp_state_dict_type": constants.FSDP_STATE_DICT_TYPE,
             "offload_optimizer_device": ["none", "cpu", "nvme"], "offload_param_device": ["none", "cpu", "nvme"],
             "zero_stage": [0, 1, 2, 3]}
    for name, choices in known.items():
        options[name] = (options.get(name, (str, None))[0], list(choices))
    return options


_BOOLEAN_OPTIONS = re.compile(r"^(fsdp_(offload_params|forward_prefetch|use_orig_params|cpu_ram_efficient_loading|"
                              r"sync_module_states|activation_checkpointing|activation_checkpointing_offload)|zero3_\w+)$")


def _check_launch_options(section: str, values: dict[str, Any]) -> list[str]:
    options = _launch_choices()
    problems = []
    for key, value in values.items():
        name = f"{section}.{key}"
        if key not in options:
            candidates = [o for o in options if o.startswith("fsdp_")] if section == "fsdp_config" else [
                o for o in options if not o.startswith(("fsdp_", "megatron", "tpu", "fp8", "mpirun"))]
            problems.append(_unknown(name, candidates, key))
            continue
        tp, choices = options[key]
        if _BOOLEAN_OPTIONS.match(key):
            if not (isinstance(value, bool) or str(value).lower() in ("true", "false")):
                problems.append(f"{name}: expected true or false, got {value!r}")
        elif choices is not None and value not in choices and str(value) not in map(str, choices):
            problems.append(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
        elif tp in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            if not (tp is int and value == "auto"):
                problems.append(f"{name}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")
    return problems


def _unknown(name: str, candidates: list[str], key: str | None = None) -> str:
    close = difflib.get_close_matches(key or name, candidates, n=1, cutoff=0.7)
    return f"{name}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")


validate.positional = ("file",)  # type: ignore[attr-defined]  # `medtune validate CONFIG [CONFIG ...]`

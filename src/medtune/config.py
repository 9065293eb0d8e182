"""Typed configuration: dataclasses whose fields are the command-line flags and the YAML recipe keys.

A command is a plain function whose parameters are annotated with config dataclasses (or plain
types); `medtune.cli` turns those into flags. Every field carries its help text in
``field(metadata={"help": ...})``. A YAML recipe is validated against the same dataclasses: unknown
keys and bad values are reported together, each named by its key.

    >>> from medtune.config import load_recipe
    >>> cfg = load_recipe("configs/tiny/lora-cpu.yaml", train_fn)   # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin


class ConfigError(ValueError):
    """One or more configuration problems; the message lists each with the key or flag it concerns."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        head = f"{source}: " if source else ""
        if len(problems) == 1:
            super().__init__(head + problems[0])
        else:
            super().__init__(head + f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def arg(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable | None = None, **meta: Any):
    """A dataclass field with help text (shorthand used by every config dataclass)."""
    metadata = {"help": help, **meta}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------- type handling

def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert ``value`` (from YAML or argv) to ``tp``; raise ValueError naming ``name`` on failure."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}: must not be empty")
    origin = get_origin(inner)
    if origin is Literal:
        choices = get_args(inner)
        if value not in choices:
            raise ValueError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = get_args(inner) or (str,)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [coerce(v, item_tp, name) for v in items]
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected an integer, got {value!r}") from None
    if inner is float:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if inner is Path:
        if not isinstance(value, (str, Path)):
            raise ValueError(f"{name}: expected a path, got {value!r}")
        return Path(value)
    if inner is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type, values: dict[str, Any], *, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping, collecting every problem before raising."""
    problems: list[str] = []
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key).replace("-", "_"), sorted(names), n=1, cutoff=0.7)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{prefix}{key}: unknown key{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{prefix}{f.name}: required (flag {_flag(f.name)})")
            continue
        try:
            kwargs[f.name] = coerce(values[f.name], hints[f.name], prefix + f.name)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(problems)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError([f"{prefix.rstrip('.') or cls.__name__}: {e}"]) from None


# ----------------------------------------------------------------------------- functions as commands

def command_params(fn: Callable) -> list[tuple[str, Any, Any]]:
    """(name, type, default) of each parameter of a command function."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    return [(n, hints.get(n, str), p.default) for n, p in sig.parameters.items()]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_field(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, tp: Any,
               default: Any, help: str, dest: str) -> None:
    inner, _ = _unwrap_optional(tp)
    kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
    shown = default if default is not dataclasses.MISSING and default is not inspect.Parameter.empty else None
    if inner is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif get_origin(inner) is Literal:
        kw["choices"] = list(get_args(inner))
    elif get_origin(inner) in (list, tuple):
        kw["action"] = "append"
        kw["metavar"] = name.upper()
    else:
        kw["metavar"] = {int: "N", float: "X", Path: "PATH"}.get(inner, name.upper())
    required = default is dataclasses.MISSING or default is inspect.Parameter.empty
    text = help or ""
    if not required and shown not in (None, "", []):
        text += f" (default: {shown})"
    kw["help"] = text + (" [required]" if required else "")
    parser.add_argument(_flag(name), **kw)


def param_help(fn: Callable) -> dict[str, str]:
    """Help for plain parameters from the function docstring's ``Args:`` section (``name: text`` lines)."""
    doc = inspect.getdoc(fn) or ""
    helps: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:"):
            in_args = True
            continue
        if in_args:
            m = re.match(r"^\s+(\w+)(?: \(.*?\))?:\s*(.*)$", line)
            if m:
                helps[m.group(1)] = m.group(2)
            elif line.startswith((" ", "\t")) and helps:
                helps[list(helps)[-1]] += " " + line.strip()
            elif line.strip():
                in_args = False
    return helps


class _Extend(argparse.Action):
    """Positional words added to what the list flag of the same name collected."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values:
            setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *values])


def add_arguments(parser: argparse.ArgumentParser, fn: Callable) -> None:
    """Add a flag for every field of every dataclass parameter of ``fn`` (and its plain parameters)."""
    helps = param_help(fn)
    for pname, tp, default in command_params(fn):
        if dataclasses.is_dataclass(tp):
            group = parser.add_argument_group(pname, (tp.__doc__ or "").strip().splitlines()[0])
            hints = _hints(tp)
            for f in dataclasses.fields(tp):
                if f.metadata.get("cli", True) is False:
                    continue
                d = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
                _add_field(group, f.name, hints[f.name], d, f.metadata.get("help", ""), f"{pname}.{f.name}")
        else:
            _add_field(parser, pname, tp, default, helps.get(pname, ""), pname)
            if pname in getattr(fn, "positional", ()):
                # `medtune ask "问题"`, `medtune validate CONFIG...`: also taken as positional words, into the
                # flag's destination (a list flag collects both).
                many = get_origin(_unwrap_optional(tp)[0]) in (list, tuple)
                parser.add_argument(pname, nargs="*" if many else "?", default=argparse.SUPPRESS,
                                    action=_Extend if many else "store", metavar=pname.upper(),
                                    help=f"same as {_flag(pname)}")
    parser.add_argument("--config", type=Path, metavar="YAML",
                        help="YAML recipe whose keys set these options; flags given here override it")


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping of option: value"], str(path))
    return data


def resolve(fn: Callable, flags: dict[str, Any], config: Path | None = None) -> dict[str, Any]:
    """Keyword arguments for ``fn`` from a YAML recipe and flags (flags win); all problems raised at once.

    ``flags`` maps ``"group.field"`` or ``"param"`` to values. A recipe may nest fields under their
    group (``train: {lr: 1e-4}``) or give them flat (``lr: 1e-4``) when the name is unambiguous.
    """
    params = command_params(fn)
    groups = {n: tp for n, tp, _ in params if dataclasses.is_dataclass(tp)}
    owners: dict[str, list[str]] = {}
    for g, tp in groups.items():
        for f in dataclasses.fields(tp):
            owners.setdefault(f.name, []).append(g)
    values: dict[str, dict[str, Any]] = {g: {} for g in groups}
    plain: dict[str, Any] = {}
    problems: list[str] = []
    if config is not None:
        for key, val in _read_yaml(config).items():
            if key in groups:
                if not isinstance(val, dict):
                    problems.append(f"{key}: expected a mapping of {key} options")
                    continue
                values[key].update(val)
            elif key in owners and len(owners[key]) == 1:
                values[owners[key][0]][key] = val
            elif key in owners:
                problems.append(f"{key}: ambiguous, nest it under one of {', '.join(owners[key])}")
            elif any(key == n for n, _, _ in params):
                plain[key] = val
            else:
                # Let `build` report it with a did-you-mean against the first group.
                target = next(iter(groups), None)
                if target is None:
                    problems.append(f"{key}: unknown key")
                else:
                    values[target][key] = val
    for dest, val in flags.items():
        if "." in dest:
            g, name = dest.split(".", 1)
            values[g][name] = val
        else:
            plain[dest] = val
    kwargs: dict[str, Any] = {}
    for name, tp, default in params:
        if name in groups:
            try:
                kwargs[name] = build(tp, values[name], prefix=f"{name}." if len(groups) > 1 else "")
            except ConfigError as e:
                problems.extend(e.problems)
        elif name in plain:
            try:
                kwargs[name] = coerce(plain[name], tp, name)
            except ValueError as e:
                problems.append(str(e))
        elif default is inspect.Parameter.empty:
            problems.append(f"{_flag(name)} is required")
    if problems:
        raise ConfigError(problems, str(config) if config else None)
    return kwargs


# ----------------------------------------------------------------------------- shared argument groups

@dataclasses.dataclass
class ModelArgs:
    """Which model to load: the base, its adapters, where it comes from, and how (profile, quantisation)."""

    model: str = arg("Qwen/Qwen3-4B", "base model: a local directory or a hub id (downloaded into --models-dir/<id>)")
    adapter: list[str] = arg(factory=list, help="adapter directory; repeat the flag where several make sense")
    hub: Literal["modelscope", "hf"] = arg("modelscope", "hub a model id is downloaded from: ModelScope or Hugging Face")
    revision: str | None = arg(None, "hub revision (branch, tag or commit) of --model; recorded in the adapter's manifest")
    profile: str | None = arg(None, "hardware profile (cpu, cuda-8gb, cuda-12gb, cuda-16gb, cuda-24gb, cuda-40gb+, multi-gpu); detected when omitted")
    quant: Literal["none", "int8", "nf4"] | None = arg(None, "quantisation of the base weights; overrides the profile's")
    models_dir: Path = arg(Path("models"), "where hub downloads are kept")

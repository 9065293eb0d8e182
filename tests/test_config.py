"""Typed config: flags and YAML recipes map onto dataclasses; every problem is named, all at once."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest

from medtune.config import ConfigError, ModelArgs, arg, build, resolve


@dataclasses.dataclass
class _Opts:
    """Options for a toy command."""

    lr: float = arg(1e-4, "learning rate")
    steps: int = arg(10, "optimizer steps")
    method: Literal["lora", "qlora"] = arg("lora", "fine-tuning method")
    packing: bool = arg(True, "pack examples")
    targets: list[str] = arg(factory=lambda: ["q_proj"], help="target modules")


def _command(model: ModelArgs, opts: _Opts, output: Path, seed: int = 0):
    return model, opts, output, seed


def test_build_reports_every_bad_field_at_once():
    with pytest.raises(ConfigError) as e:
        build(_Opts, {"lr": "fast", "steps": 2.5, "method": "full", "pakcing": True})
    msg = str(e.value)
    assert len(e.value.problems) == 4
    assert "lr: expected a number" in msg
    assert "steps: expected an integer" in msg
    assert "method: 'full' is not one of lora, qlora" in msg
    assert "pakcing: unknown key (did you mean 'packing'?)" in msg


def test_yaml_recipe_then_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  model: models/tiny\n  quant: nf4\nopts:\n  lr: 3e-3\nsteps: 50\noutput: runs/x\n",
                      encoding="utf-8")
    kw = resolve(_command, {"opts.steps": 7, "model.adapter": ["a", "b"]}, recipe)
    assert kw["model"].model == "models/tiny" and kw["model"].quant == "nf4"
    assert kw["model"].adapter == ["a", "b"]
    assert kw["opts"].lr == pytest.approx(3e-3) and kw["opts"].steps == 7  # the flag wins over the file
    assert kw["output"] == Path("runs/x") and _command(**kw)[3] == 0


def test_yaml_recipe_with_two_bad_fields_names_both(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("opts:\n  lr: abc\n  stepz: 3\noutput: o\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        resolve(_command, {}, recipe)
    assert str(recipe) in str(e.value)
    assert any("opts.lr" in p for p in e.value.problems)
    assert any("opts.stepz: unknown key" in p for p in e.value.problems)


def test_missing_required_parameter_is_named():
    with pytest.raises(ConfigError, match="--output is required"):
        resolve(_command, {}, None)


def test_recipe_must_be_a_mapping(tmp_path):
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        resolve(_command, {}, recipe)


def test_plain_parameter_help_comes_from_the_docstring():
    import argparse

    from medtune.config import add_arguments

    def cmd(data: Path, output: Path, seed: int = 3):
        """Do a thing.

        Args:
            data: the prepared data
                directory
            output: where to write
        """

    p = argparse.ArgumentParser()
    add_arguments(p, cmd)
    text = p.format_help()
    assert "the prepared data directory" in text and "where to write" in text and "(default: 3)" in text

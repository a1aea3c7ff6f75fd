"""configs/*.yaml: each recipe's command line (the header's `chatfoundry ... --config FILE` line)
parses and resolves its config with every field valid; configs/README.md names every recipe; the
default pipeline's recipe is the default pipeline."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from chatfoundry.cli import build_parser
from chatfoundry.commands.common import stage_config
from chatfoundry.config import resolve_config, to_dict, validate
from chatfoundry.pipeline import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]


def _resolve(argv: list[str]):
    """The config `chatfoundry ARGV` would run with: parsed, the YAML read, the flags applied, validated."""
    args = build_parser().parse_args(argv)
    return (stage_config if hasattr(args, "resume") else resolve_config)(args.config_class, args), args
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def _command(recipe: Path) -> list[str]:
    """The recipe's command line from its header, run from the repository's root."""
    lines = [line.strip("# ").strip() for line in recipe.read_text().splitlines() if line.startswith("#")]
    commands = [line for line in lines if line.startswith("chatfoundry ")]
    assert len(commands) == 1, f"{recipe.name}: its header names one command line to run it"
    argv = shlex.split(commands[0])[1:]
    assert argv[argv.index("--config") + 1] == f"configs/{recipe.name}", recipe.name
    return argv


def test_there_are_the_recipes_the_docs_promise():
    names = {r.stem for r in RECIPES}
    assert {"pipeline", "pipeline-mini", "pipeline-gpu", "shakespeare-char"} <= names and len(names) >= 10
    index = (ROOT / "configs" / "README.md").read_text()
    assert all(f"({r.name})" in index and f"--config configs/{r.name}" in index for r in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_each_recipe_resolves_for_its_command(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg, args = _resolve(_command(recipe))
    assert to_dict(cfg) != to_dict(args.config_class()) or recipe.name == "pipeline.yaml"


def test_the_default_pipeline_recipe_is_the_default(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg, _ = _resolve(_command(ROOT / "configs" / "pipeline.yaml"))
    default = PipelineConfig()
    validate(default)  # as a run resolves it (SFT's packing: none -> true)
    got, default = to_dict(cfg), to_dict(default)
    assert {k: v for k, v in got.items() if k != "out"} == {k: v for k, v in default.items() if k != "out"}


def test_a_flag_wins_over_the_recipe(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg, _ = _resolve(["dpo", "--config", "configs/dpo-plain.yaml", "--beta", "0.3", "--init", "x", "--data", "y"])
    assert (cfg.beta, cfg.nll_coef) == (0.3, 0.0)

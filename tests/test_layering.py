"""The import graph, walked from the source (imports inside functions too): no stage imports
another stage, and the data layer never reaches up into training, serving or the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import chatfoundry

ROOT = Path(chatfoundry.__file__).parent
# The stages of the recipe: each a `run` behind a command, each read top to bottom on its own.
STAGES = {f"chatfoundry.train.{name}" for name in ("pretrain", "sft", "label", "reward", "ppo", "dpo", "grpo", "best_of_n", "seq2seq", "head")}
ABOVE_DATA = ("chatfoundry.train", "chatfoundry.serve", "chatfoundry.eval", "chatfoundry.rl", "chatfoundry.pipeline",
              "chatfoundry.cli")


def modules() -> dict[str, set[str]]:
    """Every chatfoundry module and the chatfoundry modules it imports, anywhere in its body."""
    names = {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from chatfoundry.train import label` imports the module chatfoundry.train.label
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                          for a in node.names}
        graph[name] = {m for m in found if m.startswith("chatfoundry")}
    return graph


def test_no_stage_imports_another_stage():
    graph = modules()
    assert STAGES <= set(graph)
    crossing = {(a, b) for a in STAGES for b in graph[a] & STAGES if b != a}
    assert not crossing, crossing


def test_the_data_layer_does_not_reach_up():
    graph = modules()
    up = {(a, b) for a in graph if a.startswith("chatfoundry.data") for b in graph[a] if b.startswith(ABOVE_DATA)}
    assert not up, up


def test_only_the_commands_import_the_pipeline_and_the_cli_is_a_registry():
    graph = modules()
    assert all(a.startswith("chatfoundry.commands.") for a, bs in graph.items() if "chatfoundry.pipeline" in bs)
    assert {a for a, bs in graph.items() if "chatfoundry.cli" in bs} <= {"chatfoundry.__main__"}
    assert len((ROOT / "cli.py").read_text().splitlines()) < 200  # each command group registers its own parsers


def test_no_module_imports_itself_back():
    """No import cycle anywhere, hidden in a function or not (corpus.py and world.py once had one)."""
    graph = modules()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)):
                return True
        return False

    cycles = sorted(name for name in graph if reaches(name, name, set()))
    assert not cycles, cycles


def test_every_stage_starts_through_one_skeleton():
    """The config header, the run folder and the runtime live in train/stage.py: each stage's config
    extends StageConfig, its run goes through stage.start, and none prepares a folder by hand."""
    import importlib
    import inspect

    from chatfoundry.train.stage import StageConfig

    for name in STAGES:
        module = importlib.import_module(name)
        source = inspect.getsource(module)
        configs = [v for v in vars(module).values()
                   if isinstance(v, type) and issubclass(v, StageConfig) and v.__module__ == name]
        assert configs, f"{name}: no config extends StageConfig"
        assert "start(" in source and "check_output(" not in source and "setup_runtime(" not in source, name

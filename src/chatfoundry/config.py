"""Dataclass configs from a YAML file plus dotted command-line overrides.

Every stage's config is a tree of dataclasses. `add_config_args` turns each leaf field into a
flag (`--train.lr 3e-4`), `resolve_config` layers defaults < YAML file < flags, converts and
type-checks every value, runs each section's `validate()` and returns the tree: all before any
heavy work, so a typo costs a second, not a run. Errors are one `UserError` line naming the field.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import io
import os
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from chatfoundry.errors import UserError


def default_cache_dir() -> Path:
    """Where token shards, trained tokenizers and converted Hub models are cached: $CHATFOUNDRY_CACHE,
    else $XDG_CACHE_HOME/chatfoundry, else ~/.cache/chatfoundry."""
    root = os.environ.get("CHATFOUNDRY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chatfoundry")
    return Path(root)


_SUPPRESS = argparse.SUPPRESS


# ---------------------------------------------------------------- fields and values


def leaf_fields(cls: type, prefix: str = "") -> dict[str, Any]:
    """Map dotted name -> type for every non-dataclass field of a dataclass tree."""
    out: dict[str, Any] = {}
    for f, tp in _fields(cls):
        name = prefix + f.name
        if dataclasses.is_dataclass(tp):
            out.update(leaf_fields(tp, name + "."))
        else:
            out[name] = tp
    return out


def field_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """Map dotted name -> the comment that documents the field in its dataclass's source: the one
    on the field's line, else the comment lines right above it (joined into one line)."""
    out: dict[str, str] = {}
    own: dict[str, str] = {}
    for base in reversed(cls.__mro__):  # a field a subclass redeclares takes the subclass's comment
        if dataclasses.is_dataclass(base):
            own.update({k: v for k, v in _comments(base).items() if v})
    for f, tp in _fields(cls):
        if dataclasses.is_dataclass(tp):
            out.update(field_docs(tp, prefix + f.name + "."))
        elif own.get(f.name):
            out[prefix + f.name] = own[f.name]
    return out


@functools.lru_cache(maxsize=None)
def _comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined where there is no source to read
        return {}
    lines = source.splitlines()
    by_line = {t.start[0]: t.string.lstrip("#").strip()
               for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        on_line = [by_line[n] for n in range(node.lineno, node.end_lineno + 1) if n in by_line]
        above, n = [], node.lineno - 1
        while n >= 1 and lines[n - 1].strip().startswith("#"):
            above.insert(0, by_line[n])
            n -= 1
        out[node.target.id] = " ".join(on_line or above)
    return out


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def convert(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML value or a command-line string to the field's type, or raise naming the field."""
    if _is_union(tp):  # Optional[X]: None or X
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return convert(name, _non_optional(tp), value)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise UserError(f"{name}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [convert(name, item_tp, v) for v in items if v != ""]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise UserError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{name}: expected an integer, got {value!r}")
        try:
            as_float = float(value)  # accept 1e4 and "2000" alike, but not 2.5
        except (TypeError, ValueError):
            raise UserError(f"{name}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise UserError(f"{name}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{name}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    raise TypeError(f"unsupported config type {tp} for {name}")


def set_dotted(cfg: Any, name: str, value: Any) -> None:
    *path, leaf = name.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)


def get_dotted(cfg: Any, name: str) -> Any:
    obj = cfg
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------- command line


# Fields renamed without a shim: an old config file or flag hears the new name. Keyed by the
# name's last parts, so `ppo.rm` in a pipeline's config matches `rm`.
RENAMED = {"rm": "reward (rm:PATH)", "policy": "init", "rollout.prompts": "rollout.pool", "clip_vf": "value_clip",
           "lam": "gae_lambda", "grad_clip": "max_grad_norm",
           # the LM PPO's update knobs, once a `ppo` section (`--ppo.ppo.lr` in the pipeline)
           "ppo.lam": "gae_lambda", "ppo.grad_clip": "max_grad_norm",
           **{f"ppo.{name}": name for name in ("objective", "epochs", "minibatch_size", "lr", "critic_lr", "clip",
                                               "value_clip", "penalty_beta", "penalty_target", "gamma",
                                               "whiten_advantages", "whiten_rewards", "reward_clip", "target_kl",
                                               "ptx_coef", "ptx_batch_size")}}


def _renamed(name: str) -> str | None:
    for old in sorted(RENAMED, key=len, reverse=True):  # the most specific match
        if name == old or name.endswith("." + old):
            return name[:len(name) - len(old)] + RENAMED[old]
    return None


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (with a suggestion) and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # subcommand parsers too: --train.ste is not --train.steps
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        # The fields' descriptions come from their dataclasses' source, read only when help is
        # printed: every command builds every subparser, and reading sources costs ~0.4 s.
        cls, actions = getattr(self, "_config_fields", (None, ()))
        if cls is not None:
            docs = field_docs(cls)
            for action, name in actions:
                if name in docs:
                    action.help = docs[name].rstrip(".").replace("%", "%%") + "; " + action.help
            self._config_fields = (None, ())
        return super().format_help()

    _active: ArgumentParser | None = None  # the innermost parser of the last parse: the subcommand's

    def parse_known_args(self, args=None, namespace=None):
        ArgumentParser._active = self  # a subcommand's parser starts after the top one's: it is the last set
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments:"):
            bad = message.split(":", 1)[1].split()
            flags = [b for b in bad if b.startswith("--")]
            if flags:
                flag = flags[0].split("=")[0]
                message = f"unknown option {flags[0]}" + _hint(flag, ArgumentParser._active or self)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _hint(flag: str, parser: argparse.ArgumentParser) -> str:
    """What an unknown flag of `parser`'s command should have been: its new name, the same name
    with underscores (every flag is spelled as its YAML key), the dotted fields it is the last part
    of (--batch_size: --rollout.batch_size), or the closest flag."""
    renamed = _renamed(flag[2:])
    if renamed:
        return f" (renamed: --{renamed})"
    known = sorted(_option_strings(parser))
    name = flag[2:].replace("-", "_")
    hint = [f"--{name}"] if f"--{name}" in known else [k for k in known if k.endswith("." + name)]
    hint = hint or difflib.get_close_matches(flag, known, n=1)
    return f" (did you mean {' or '.join(hint)}?)" if hint else ""


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every flag of `parser` and of its subcommands (unknown flags are reported by the top parser)."""
    out: set[str] = set()
    for action in parser._actions:
        out.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _option_strings(sub)
    return out


def add_config_args(parser: argparse.ArgumentParser, cls: type, aliases: dict[str, str] | None = None) -> None:
    """One flag per leaf field, named by its dotted path; defaults stay in the dataclass."""
    parser.add_argument("--config", metavar="YAML", help="YAML file with any of the fields below")
    aliases = aliases or {}
    group = parser.add_argument_group("config fields (YAML keys or --dotted.flags)")
    defaults = cls()
    actions = []
    for name, tp in leaf_fields(cls).items():
        flags = [f"--{name}"] + [a for a, target in aliases.items() if target == name]
        default = get_dotted(defaults, name)
        help_text = f"default: {default!r}"  # the field's description goes before it (ArgumentParser.format_help)
        choices = _choices(tp)
        if choices:
            help_text += f"; one of {', '.join(map(str, choices))}"
        if _non_optional(tp) is bool:  # a bare --flag is true
            action = group.add_argument(*flags, dest=name, nargs="?", const="true", default=_SUPPRESS,
                                        metavar="BOOL", help=help_text)
        elif typing.get_origin(tp) is list:
            # `--ckpt A B` and `--ckpt A --ckpt B` alike: a repeated flag adds to the list
            action = group.add_argument(*flags, dest=name, nargs="+", action="extend", default=_SUPPRESS,
                                        metavar="VALUE", help=help_text)
        else:
            action = group.add_argument(*flags, dest=name, default=_SUPPRESS, metavar=_metavar(tp), help=help_text)
        actions.append((action, name))
    parser._config_fields = (cls, actions)


def _non_optional(tp: Any) -> Any:
    return [a for a in typing.get_args(tp) if a is not type(None)][0] if _is_union(tp) else tp


def _choices(tp: Any) -> tuple | None:
    tp = _non_optional(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _metavar(tp: Any) -> str:
    return {int: "INT", float: "FLOAT", str: "STR"}.get(_non_optional(tp), "VALUE")


def cli_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The dotted fields the user actually gave on the command line."""
    return {name: getattr(args, name) for name in leaf_fields(cls) if hasattr(args, name)}


# ---------------------------------------------------------------- resolution


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        line = f":{where.line + 1}" if where is not None else ""
        raise UserError(f"{p}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{p}: expected a mapping of config fields at the top level")
    return flatten(tree)


def build_config(cls: type, layers: list[tuple[str, dict[str, Any]]]) -> Any:
    """Apply (source, {dotted: value}) layers in order onto cls's defaults, then validate.

    A section, or cls itself, may define `from_preset(**named)`: its `preset`-like keys (listed in
    `PRESET_KEYS`) are applied first from all layers together, so `--model.n_layer 8` refines a
    preset whichever layer names the preset.
    """
    known = leaf_fields(cls)
    merged: dict[str, tuple[str, Any]] = {}
    for source, values in layers:
        for name, value in values.items():
            if name not in known:
                renamed, hint = _renamed(name), difflib.get_close_matches(name, known, n=1)
                raise UserError(f"{source}: unknown config key '{name}'" + (
                    f" (renamed: '{renamed}')" if renamed else f" (did you mean '{hint[0]}'?)" if hint else ""))
            merged[name] = (source, value)
    named = {k: convert(k, known[k], merged.pop(k)[1]) for k in getattr(cls, "PRESET_KEYS", ()) if k in merged}
    cfg = cls.from_preset(**named) if named else cls()
    _apply_presets(cfg, "", merged, known)
    for name, (source, value) in merged.items():
        set_dotted(cfg, name, convert(name, known[name], value))
    validate(cfg)
    return cfg


def _apply_presets(cfg: Any, prefix: str, merged: dict, known: dict) -> None:
    """Rebuild each section (at any depth) whose preset keys a layer names, from its preset; keys
    it leaves out keep the section's default (the pretraining default's flavour, say)."""
    for f, tp in _fields(type(cfg)):
        if not dataclasses.is_dataclass(tp):
            continue
        name, section = prefix + f.name, getattr(cfg, f.name)
        keys = getattr(tp, "PRESET_KEYS", ())
        named = {k: convert(f"{name}.{k}", known[f"{name}.{k}"], merged.pop(f"{name}.{k}")[1])
                 for k in keys if f"{name}.{k}" in merged}
        if named:
            setattr(cfg, f.name, tp.from_preset(**{**{k: getattr(section, k) for k in keys}, **named}))
        elif not keys:
            _apply_presets(section, name + ".", merged, known)


def validate(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()


def resolve_config(cls: type, args: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    """defaults < base (e.g. a resumed run's config.yaml) < --config YAML < command-line flags."""
    layers = []
    if base:
        layers.append(("saved config", base))
    if getattr(args, "config", None):
        layers.append((str(args.config), load_yaml(args.config)))
    layers.append(("command line", cli_overrides(args, cls)))
    return build_config(cls, layers)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def require(ok: bool, field: str, message: str) -> None:
    """Validation helper: `require(lr > 0, "train.lr", f"must be > 0, got {lr}")`."""
    if not ok:
        raise UserError(f"{field}: {message}")

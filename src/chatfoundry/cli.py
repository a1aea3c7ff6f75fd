"""The `chatfoundry` command: a registry of the subcommands, which live in groups under
`chatfoundry/commands/` (the recipe's stages, using a model, data and checkpoints) and in
`chatfoundry/rl/cli.py` (classic RL).

Errors a user can cause print one line and exit with status 2; with `--json` the last line of
standard output is a JSON summary that scripts (and later stages) read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from chatfoundry.commands import files, models, recipe
from chatfoundry.config import ArgumentParser
from chatfoundry.errors import UserError
from chatfoundry.rl.cli import add_rl_parser


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="chatfoundry", allow_abbrev=False,
                            description="The ChatGPT recipe, small enough to read and run on a laptop.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for group in (recipe, models, files):
        group.add_parsers(sub)
    add_rl_parser(sub)  # chatfoundry rl train | compare | play
    return parser


def main(argv: list[str] | None = None) -> int:
    from chatfoundry.train.loop import TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except UserError as e:
        print(f"chatfoundry {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"chatfoundry {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"chatfoundry {args.command}: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False) and os.environ.get("RANK", "0") == "0":  # one summary under torchrun
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every command's --help describes each config field in a line, not only its default."""

from __future__ import annotations

import re

import pytest

from chatfoundry.config import field_docs, leaf_fields
from chatfoundry.pipeline import PipelineConfig
from chatfoundry.rl.train import RLConfig
from chatfoundry.train.best_of_n import BestOfNConfig
from chatfoundry.train.dpo import DPOConfig
from chatfoundry.train.grpo import GRPOConfig
from chatfoundry.train.head import HeadConfig
from chatfoundry.train.label import LabelConfig
from chatfoundry.train.ppo import PPOConfig
from chatfoundry.train.pretrain import PretrainConfig
from chatfoundry.train.reward import RMConfig
from chatfoundry.train.seq2seq import FinetuneSeq2SeqConfig
from chatfoundry.train.sft import SFTConfig

from conftest import run_cli

COMMANDS = {"pretrain": PretrainConfig, "sft": SFTConfig, "label": LabelConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig, "grpo": GRPOConfig, "best-of-n": BestOfNConfig,
            "pipeline": PipelineConfig, "finetune-seq2seq": FinetuneSeq2SeqConfig, "finetune-head": HeadConfig,
            "rl train": RLConfig}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_config_field_is_documented(command):
    cls = COMMANDS[command]
    docs = field_docs(cls)
    missing = [name for name in leaf_fields(cls) if name not in docs]
    assert not missing, f"{command} ({cls.__name__}): no description for {', '.join(missing)}"


def test_help_shows_field_descriptions(capsys):
    code, out, _ = run_cli(["sft", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())  # argparse wraps help lines to the terminal's width
    description = field_docs(SFTConfig)["train.lr"]
    assert description == "peak learning rate (AdamW), reached after warmup"
    assert re.search(r"--train\.lr FLOAT " + re.escape(description) + r"; default: 0\.001", text)


def test_every_flag_is_spelled_with_underscores_and_a_hyphen_hears_how(capsys):
    """One spelling across the argparse and the config-driven commands: a flag is its YAML key."""
    from chatfoundry.cli import build_parser
    from chatfoundry.config import _option_strings

    flags = _option_strings(build_parser())
    assert "--max_new_tokens" in flags and "--api_key" in flags and "--rollout.batch_size" in flags
    assert not [f for f in flags if f.startswith("--") and "-" in f[2:]]
    code, _, err = run_cli(["generate", "--ckpt", "x", "--max-new-tokens", "3"], capsys)
    assert code == 2
    assert "unknown option --max-new-tokens (did you mean --max_new_tokens?)" in err


@pytest.mark.parametrize("argv, hint", [
    (["ppo", "--init", "x", "--reward", "verifier", "--batch_size", "3"],
     "unknown option --batch_size (did you mean --eval.batch_size or --rollout.batch_size?)"),
    (["sft", "--init", "x", "--lr", "3"], "unknown option --lr (did you mean --train.lr?)"),
    (["sft", "--init", "x", "--train.ste", "3"], "unknown option --train.ste (did you mean --train.steps?)"),
    (["rl", "train", "--eval-episodes", "3"], "unknown option --eval-episodes (did you mean --eval_episodes?)"),
])
def test_a_did_you_mean_names_the_whole_dotted_flag_of_that_command(argv, hint, capsys):
    """The hint comes from the command's own flags (--batch_size is eval's, not ppo's)."""
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and hint in err

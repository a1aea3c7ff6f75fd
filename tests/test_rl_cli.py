"""`chatfoundry rl train | compare | play`: outputs, JSON summaries and one-line refusals."""

from __future__ import annotations

import importlib.util

import gymnasium as gym
import pytest
import yaml

from chatfoundry.rl.common import resolve_env_id

from conftest import last_json, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = ["--steps", "512", "--eval_episodes", "3", "--progress", "false"]


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, lines
    assert lines[0].startswith("chatfoundry rl: error:"), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """One small PPO run on CartPole through the CLI, shared by the tests that read it."""
    from chatfoundry.cli import main

    out = tmp_path_factory.mktemp("rl") / "ppo"
    assert main(["rl", "train", "--algo", "ppo", "--env", "CartPole-v1", "--seed", "1", "--out", str(out), *QUICK]) == 0
    return out


def test_train_writes_the_run_folder_and_a_json_summary(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["rl", "train", "--algo", "ppo-kl", "--env", "CartPole-v1", "--out", str(out),
                                 "--ppo.lr", "5e-4", "--json", *QUICK], capsys)
    assert code == 0, err
    summary = last_json(stdout)
    assert summary["algo"] == "ppo-kl" and summary["env"] == "CartPole-v1" and summary["steps"] == 512
    assert summary["eval_return"] > 0 and summary["eval_episodes"] == 3 and summary["reward_threshold"] == 475
    for name in ("config.yaml", "metrics.jsonl", "returns.png", "losses.png", "agent.json", "model.safetensors",
                 "eval.json"):
        assert (out / name).is_file(), name
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["algo"] == "ppo-kl" and cfg["ppo"]["lr"] == 5e-4 and cfg["ppo"]["n_steps"] == 32  # flag over preset
    assert "dqn" not in cfg and "trpo" not in cfg  # only the algorithm that ran


def test_an_existing_run_is_kept_unless_overwrite(ppo_run, capsys):
    before = (ppo_run / "model.safetensors").read_bytes()
    code, _, err = run_cli(["rl", "train", "--algo", "dqn", "--out", str(ppo_run), *QUICK], capsys)
    assert code == 2 and "--overwrite" in one_error_line(err)
    assert (ppo_run / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("argv, message", [
    (["--algo", "qlearning", "--env", "CartPole-v1"], "Discrete observations"),
    (["--algo", "dqn", "--env", "Pendulum-v1"], "Discrete actions"),
    (["--algo", "sarsa"], "is not one of"),
    (["--env", "NoSuchEnv-v0"], "not a registered gymnasium environment"),
    (["--steps", "0"], "steps: must be > 0"),
    (["--algo", "trpo", "--steps", "100"], "at least n_envs x n_steps"),
    (["--ppo.lr", "-1"], "ppo.lr"),
    (["--env_kwargs", "oops"], "KEY=VALUE"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    code, _, err = run_cli(["rl", "train", "--out", str(out), "--progress", "false", *argv], capsys)
    assert code == 2
    assert message in one_error_line(err)
    assert not out.exists()


def test_play_prints_returns_and_writes_gifs(ppo_run, tmp_path, capsys):
    code, stdout, err = run_cli(["rl", "play", "--ckpt", str(ppo_run), "--episodes", "2", "--no_gif", "--json"], capsys)
    assert code == 0, err
    result = last_json(stdout)
    assert len(result["returns"]) == 2 and result["gifs"] == [] and "episode 1: return" in stdout
    if importlib.util.find_spec("pygame") is None:
        code, _, err = run_cli(["rl", "play", "--ckpt", str(ppo_run)], capsys)
        assert code == 2 and "pygame" in one_error_line(err)
        return
    code, stdout, err = run_cli(["rl", "play", "--ckpt", str(ppo_run), "--episodes", "1", "--out", str(tmp_path),
                                 "--json"], capsys)
    assert code == 0, err
    gif = tmp_path / "episode1.gif"
    assert last_json(stdout)["gifs"] == [str(gif)] and gif.read_bytes()[:6] == b"GIF89a"
    from PIL import Image

    with Image.open(gif) as im:  # up to one frame per step plus the first (GIF merges identical frames)
        assert 10 < im.n_frames <= int(last_json(stdout)["returns"][0]) + 1
    assert err == ""


def test_play_without_an_agent_is_refused(tmp_path, capsys):
    code, _, err = run_cli(["rl", "play", "--ckpt", str(tmp_path / "none")], capsys)
    assert code == 2 and "no trained agent" in one_error_line(err)


def test_compare_draws_one_figure_from_all_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(["rl", "compare", "--env", "CartPole-v1", "--algos", "ppo,reinforce", "--seeds", "2",
                                 "--steps", "1024", "--out", str(out), "--set", "eval_episodes=2",
                                 "--set", "progress=false", "--json"], capsys)
    assert code == 0, err
    result = last_json(stdout)
    assert set(result["algos"]) == {"ppo", "reinforce"} and result["seeds"] == 2
    assert (out / "compare.png").stat().st_size > 10_000 and (out / "compare.json").is_file()
    assert (out / "reinforce" / "seed1" / "agent.json").is_file()
    code, _, err = run_cli(["rl", "compare", "--algos", "ppo,nope", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "nope" in one_error_line(err)


def test_env_versions_resolve_to_what_this_gymnasium_registers():
    assert resolve_env_id("CartPole-v1") == "CartPole-v1"
    taxi = resolve_env_id("Taxi-v3")  # Taxi-v3 in gymnasium 1.0, Taxi-v4 from 1.3 on
    assert taxi.startswith("Taxi-v") and taxi in gym.registry
    assert resolve_env_id("CliffWalking").startswith("CliffWalking-v")


def test_qlearning_on_cliffwalking_runs_with_a_time_limit(tmp_path, capsys):
    # CliffWalking has no time limit of its own; ours (1,000 steps) keeps a greedy loop from hanging evaluation
    code, stdout, err = run_cli(["rl", "train", "--algo", "qlearning", "--env", "CliffWalking", "--steps", "20000",
                                 "--out", str(tmp_path / "cw"), "--eval_episodes", "1", "--progress", "false", "--json"],
                                capsys)
    assert code == 0, err
    assert last_json(stdout)["eval_return"] == -13  # the optimal path along the cliff

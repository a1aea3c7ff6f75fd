"""`chatfoundry pipeline` end to end on tiny settings: every stage in its folder, the report and
its plots, the --json summary, and an interrupted pipeline resuming without redoing finished stages."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, last_json, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prefixed(stage: str, flags: list[str]) -> list[str]:
    return [f"--{stage}.{f[2:]}" if f.startswith("--") else f for f in flags]


TINY_PIPELINE = [
    *_prefixed("pretrain", ["96" if i and TINY[i - 1] == "--model.block_size" else x for i, x in enumerate(TINY)
                            if x != "--device" and (not i or TINY[i - 1] != "--device")]),
    *"--sft.train.steps 4 --sft.train.batch_size 4 --sft.train.warmup_steps 1 --sft.train.eval_every 2".split(),
    *"--sft.train.save_every 4 --sft.data.conversations 32 --sft.eval.per_family 0".split(),
    *"--label.k 3 --label.train_prompts 20 --label.val_prompts 30 --label.max_new_tokens 10".split(),
    *"--rm.train.steps 4 --rm.train.batch_size 4 --rm.train.warmup_steps 1 --rm.train.eval_every 2".split(),
    *"--rm.train.save_every 4".split(),
    *"--ppo.iterations 2 --ppo.rollout.batch_size 8 --ppo.rollout.max_new_tokens 8 --ppo.rollout.pool 40".split(),
    *"--ppo.minibatch_size 4 --ppo.epochs 1 --ppo.eval.per_family 2 --ppo.eval.max_new_tokens 8".split(),
    *"--calibrate.questions 20 --calibrate.hallucination 4 --calibrate.max_new_tokens 8 --calibrate.bootstrap 50".split(),
    "--device", "cpu",
]


@pytest.mark.slow
def test_pipeline_runs_every_stage_writes_the_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["pipeline", "--out", str(out), *TINY_PIPELINE, "--json"], capsys)
    assert code == 0, err
    summary = last_json(stdout)
    stages = summary["stages"]
    assert set(stages) == {"pretrain", "sft", "label", "rm", "bon", "ppo", "calibrate"}
    assert set(stages["calibrate"]) == {"base", "sft", "ppo", "wall_s"}
    assert {"ece", "ece_ci", "ece_change", "ece_scaled", "made_up_states_value"} <= set(stages["calibrate"]["ppo"])
    assert {"gold_reward", "gold_reward_sampled", "data_gold_reward"} <= set(stages["sft"])
    assert {"gold_reward", "kl", "gold_gain", "gold_gain_se", "kl_heldout", "kl_budget", "gold_gain_sampled"} \
        <= set(stages["ppo"])
    assert {"pairwise_accuracy", "spearman_within", "spearman_gold"} <= set(stages["rm"])
    assert set(stages["rm"]["loglik_baseline"]) == {"pairwise_accuracy", "spearman_within", "spearman_gold"}
    assert set(stages["bon"]["gold_reward"]) == {"4", "16"} and stages["bon"]["kl"]["16"] == pytest.approx(1.8351, abs=1e-4)
    assert 0.85 < stages["sft"]["data_gold_reward"] < 0.97  # the crowd's demonstrations
    assert [t["temperature"] for t in summary["stages"]["ppo"]["sft_tempered"]] == [0.6, 0.4]
    for name in ("report.md", "report_scores.png", "report_overoptimization.png", "config.yaml",
                 "pretrain/checkpoint/model.safetensors", "sft/checkpoint/model.safetensors", "label/train.jsonl",
                 "rm/checkpoint/model.safetensors", "ppo/checkpoint/model.safetensors", "ppo/ppo.png",
                 "calibrate/reliability.png", "calibrate/hallucination.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| arithmetic |" in report and "chatfoundry chat --ckpt" in report and "**PPO:**" in report
    assert "Sampled answers (4 per prompt" in report and "on held-out prompts (budget 1.0)" in report
    assert "the SFT model's own log-likelihood orders the same pairs" in report
    assert "SFT itself sampled at temperature 0.6, with no reward model: gain" in report
    assert "## What each stage changed" in report and "| SFT data | the crowd's demonstrations" in report
    assert "| best-of-16 (SFT's samples, by the RM) |" in report and "| PPO | sampled |" in report
    assert "demonstrations' gold reward" in report and "within a prompt" in report
    assert "## Does the model know what it does not know?" in report and "| ppo | chat |" in report
    assert f"chatfoundry chat --ckpt {out / 'ppo'}" in stdout

    # Interrupted after the reward model: only PPO runs again, and the calibration after it.
    (out / "ppo" / "summary.json").unlink()
    before = {s: (out / s / "summary.json").stat().st_mtime_ns for s in ("pretrain", "sft", "label", "rm")}
    code, stdout, err = run_cli(["pipeline", "--out", str(out), *TINY_PIPELINE, "--json"], capsys)
    assert code == 0, err
    assert stdout.count("done, skipped") == 4 and "ppo: r" in stdout and "calibrate: running" in stdout
    assert before == {s: (out / s / "summary.json").stat().st_mtime_ns for s in before}
    assert json.loads((out / "ppo" / "summary.json").read_text())["iterations"] == 2


def test_pipeline_help_and_bad_flag(capsys):
    code, out, _ = run_cli(["pipeline", "--help"], capsys)
    assert code == 0 and "--ppo.iterations" in out and "--pretrain.train.steps" in out
    code, _, err = run_cli(["pipeline", "--ppo.iterations", "0"], capsys)
    assert code == 2 and "iterations" in err and len(err.strip().splitlines()) == 1



@pytest.mark.parametrize("crowd, message", [(["careful:1", "poet:1"], "unknown writer 'poet'"),
                                            (["careful:-0.5", "terse:1"], "weight must be >= 0"),
                                            (["careful:0", "terse:0"], "no writer has a weight above 0")])
def test_a_bad_crowd_stops_before_any_work(crowd, message, tmp_path, capsys):
    out = tmp_path / "run"
    for argv in (["pipeline", "--out", str(out), "--sft.data.crowd", *crowd],
                 ["sft", "--init", str(tmp_path / "nowhere"), "--out", str(out), "--data.crowd", *crowd],
                 ["world", "export", "--out", str(out), "--crowd", *crowd]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and message in err and "crowd" in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not out.exists()


@pytest.mark.parametrize("argv", [["pipeline"], ["label", "--init", "sft"], ["ppo", "--init", "sft", "--reward", "rm:rm"],
                                  ["ppo", "--eval_only"]], ids=["pipeline", "label", "ppo", "ppo-eval-only"])
def test_one_process_stages_refuse_torchrun_before_writing(argv, tmp_path, monkeypatch, capsys):
    # Under torchrun every rank would sample, label and write the same files; the DDP stages
    # (pretrain, sft, rm) are the ones to launch that way. No process group is joined first.
    monkeypatch.setenv("WORLD_SIZE", "2")
    if argv == ["ppo", "--eval_only"]:  # a finished run's folder, as eval-only reads it
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.yaml").write_text("init: sft\nreward: rm:rm\n")
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "runs in one process: launch it without torchrun" in err, err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == (["config.yaml", "run"] if "--eval_only" in argv else [])

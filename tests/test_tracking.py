"""`--log tensorboard`: every record of metrics.jsonl also lands in TensorBoard's event files,
read back here with TensorBoard's own reader; a resumed run purges the steps past its
checkpoint; without the extra, one clear line."""

from __future__ import annotations

import builtins

import pytest

from chatfoundry.metrics import MetricsLog, read_metrics

from conftest import TINY, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in `folder`'s event files, as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(folder, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(folder / "metrics.jsonl") if key in r]


def test_pretrain_logs_every_record_to_tensorboard_and_a_resume_purges_the_killed_steps(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    code, _, err = run_cli(["pretrain", *TINY, "--log", "tensorboard", "--out", str(out)], capsys)
    assert code == 0, err
    got = _scalars(out)
    for key in ("loss", "lr", "grad_norm", "val_loss"):
        want = _expected(out, key)
        assert want and [s for s, _ in got[key]] == [s for s, _ in want], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in want], rel=1e-6), key

    # Resume from the step-6 checkpoint of a 12-step run asked to go on to 16: steps 7..12 of the
    # first pass are purged, so each step appears once, as in metrics.jsonl.
    code, _, err = run_cli(["pretrain", *TINY, "--log", "tensorboard", "--out", str(out), "--train.steps", "16",
                            "--resume"], capsys)
    assert code == 0, err
    steps = [s for s, _ in _scalars(out)["loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == 16 and steps == [s for s, _ in _expected(out, "loss")]


def test_label_style_records_are_tagged_by_their_text_fields(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    log.write({"split": "val", "family": "arithmetic", "accuracy": 0.5, "flag": True})
    log.write({"iteration": 3, "reward": 0.25})
    log.close()
    got = _scalars(tmp_path)
    assert got == {"val/arithmetic/accuracy": [(0, 0.5)], "reward": [(3, 0.25)]}
    # A fresh log in the same folder starts the event files over, as it does metrics.jsonl.
    MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True).close()
    assert _scalars(tmp_path) == {}


def test_classic_rl_logs_to_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "rl"
    code, _, err = run_cli(["rl", "train", "--algo", "reinforce", "--env", "CartPole-v1", "--steps", "600",
                            "--log", "tensorboard", "--progress", "false", "--out", str(out)], capsys)
    assert code == 0, err
    got = _scalars(out)
    assert [s for s, _ in got["episode_return"]] == [s for s, _ in _expected(out, "episode_return")]


def test_without_the_extra_one_clear_line(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    code, _, err = run_cli(["pretrain", *TINY, "--log", "tensorboard", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and not (tmp_path / "run").exists()  # refused before anything is written
    assert err.strip().splitlines()[-1] == ("chatfoundry pretrain: error: log: tensorboard needs the tensorboard "
                                            "package: pip install 'chatfoundry[tensorboard]'")

"""`chatfoundry scaling`: the law's fit recovers a known law, the IsoFLOP minima sit where the law
puts them, and the command sweeps, fits, predicts, resumes and refuses bad input in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chatfoundry import scaling

from conftest import last_json, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAW = {"E": 1.2, "A": 30.0, "B": 80.0, "alpha": 0.4, "beta": 0.3}


def test_the_fit_recovers_a_known_law_and_its_optimum():
    rng = np.random.default_rng(0)
    N = np.repeat([5e4, 1e5, 2e5, 4e5, 8e5], 3)
    D = np.tile([1e6, 3e6, 1e7], 5) * rng.uniform(0.5, 2, 15)
    got = scaling.fit_law(N, D, scaling.law(LAW, N, D))
    for k, v in LAW.items():
        assert got[k] == pytest.approx(v, rel=1e-3), k
    opt = scaling.optimum(got)
    assert opt["a"] == pytest.approx(0.3 / 0.7, rel=1e-3) and opt["b"] == pytest.approx(0.4 / 0.7, rel=1e-3)
    # G: at C, N_opt = G (C/6)^a minimises the law along N D = C / 6.
    C = 1e13
    n_opt = opt["G"] * (C / 6) ** opt["a"]
    grid = np.geomspace(n_opt / 10, n_opt * 10, 2001)
    assert grid[np.argmin(scaling.law(LAW, grid, C / 6 / grid))] == pytest.approx(n_opt, rel=0.01)


def test_isoflop_minima_follow_the_law():
    runs, losses = [], []
    for budget in (1e12, 1e13, 1e14):
        for n in np.geomspace(2e4, 2e7, 9):
            run = scaling.Run(budget, int(n), int(n), int(6 * n), 1)
            runs.append(run)
            losses.append(float(scaling.law(LAW, n, budget / (6 * n))))
    iso = scaling.isoflop(runs, losses)
    assert all(m["inside"] for m in iso["minima"])
    assert iso["a"] == pytest.approx(0.3 / 0.7, abs=0.05) and iso["b"] == pytest.approx(0.4 / 0.7, abs=0.05)


TINY = ["--corpus_chars", "20000", "--widths", "16", "32", "48", "64", "--n_layer", "1", "--block_size", "16",
        "--batch_size", "4", "--budgets", "2e8", "4e8", "8e8", "--min_steps", "2", "--predict", "2",
        "--bootstrap", "2", "--eval_batches", "2", "--device", "cpu"]


@pytest.mark.slow
def test_scaling_sweeps_fits_predicts_and_resumes(tmp_path, capsys):
    out = tmp_path / "sc"
    code, stdout, err = run_cli(["scaling", "--out", str(out), *TINY, "--json"], capsys)
    assert code == 0, err
    r = last_json(stdout)
    assert set(r["fit"]) == {"E", "A", "B", "alpha", "beta"} and set(r["optimal"]) == {"a", "b"}
    assert {"predicted_loss", "actual_loss", "rel_error"} <= set(r["prediction"]) and r["prediction"]["budget"] == 1.6e9
    lo, hi = r["prediction"]["interval"]  # the bootstrap's refitted laws at the larger run
    assert lo <= hi and r["prediction"]["inside_interval"] == (lo <= r["prediction"]["actual_loss"] <= hi)
    assert len(r["runs"]) == 12 and all(x["val_loss"] > 0 for x in r["runs"])
    assert {"a", "b", "minima"} <= set(r["isoflop"]) and set(r["fit_intervals"]) >= {"E", "alpha", "a"}
    for name in ("isoflop.png", "law.png", "optimal.png", "scaling.json", "config.yaml", "prediction.json"):
        assert (out / name).is_file(), name
    # Each run is an ordinary pretrain run in its own folder; a second call trains nothing again.
    first = (out / "runs" / r["runs"][0]["name"] / "summary.json").stat().st_mtime_ns
    code, stdout, err = run_cli(["scaling", "--out", str(out), *TINY, "--json"], capsys)
    assert code == 0, err
    assert (out / "runs" / r["runs"][0]["name"] / "summary.json").stat().st_mtime_ns == first
    assert last_json(stdout)["runs"] == r["runs"] and last_json(stdout)["prediction"] == r["prediction"]
    assert json.loads((out / "prediction.json").read_text())["predicted_loss"] == pytest.approx(
        r["prediction"]["predicted_loss"], abs=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--budgets", "1e5", "4e8", "8e8"], "budgets: 1e+05 FLOPs give width"),
    (["--widths", "16", "24", "32", "48"], "24 is not a multiple of head_dim 16"),
    (["--budgets", "4e8", "8e8"], "give at least 3 compute budgets"),
], ids=["budget-too-small", "width", "two-budgets"])
def test_bad_input_is_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "sc"
    args = [a for a in TINY]
    for flag in ("--budgets", "--widths"):
        if flag in extra:
            i = args.index(flag)
            j = i + 1
            while j < len(args) and not args[j].startswith("--"):
                j += 1
            del args[i:j]
    code, _, err = run_cli(["scaling", "--out", str(out), *args, *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_share_of_the_sweep_trains_without_fitting(tmp_path, capsys):
    out = tmp_path / "sc"
    code, stdout, err = run_cli(["scaling", "--out", str(out), "--corpus_chars", "20000", "--widths", "16", "32",
                                 "--n_layer", "1", "--block_size", "16", "--batch_size", "4", "--budgets", "2e8",
                                 "--min_steps", "2", "--eval_batches", "2", "--sweep_only", "--device", "cpu", "--json"],
                                capsys)
    assert code == 0, err
    r = last_json(stdout)
    assert [x["name"] for x in r["runs"]] == ["c2e+08_d16", "c2e+08_d32"] and "fit" not in r
    assert (out / "runs" / "c2e+08_d16" / "summary.json").is_file() and not (out / "scaling.json").exists()


def test_the_gpu_preset_sets_its_sweep_and_a_flag_still_refines_it():
    from chatfoundry.config import build_config

    cfg = build_config(scaling.ScalingConfig, [("--config", {"batch_size": 16}), ("flags", {"preset": "gpu"})])
    assert cfg.preset == "gpu" and cfg.budgets == [3e13, 1e14, 3e14] and cfg.widths == [64, 96, 128, 192, 256]
    assert cfg.batch_size == 16 and cfg.block_size == 256  # the flag wins whichever layer names the preset
    cfg = build_config(scaling.ScalingConfig, [("flags", {"preset": "gpu"})])
    runs = scaling.plan(cfg, 80, cfg.budgets, cfg.widths)  # about 80 characters
    (check,) = scaling.plan(cfg, 80, [cfg.predict * max(cfg.budgets)], [128])
    assert 50_000 < sum(r.steps for r in runs) < 60_000 and 20_000 < check.steps < 26_000  # what its estimate counts
    assert max(r.tokens(cfg) for r in runs) < 5 * cfg.corpus_chars  # no run sees its corpus more than 5 times
    assert build_config(scaling.ScalingConfig, []).budgets == [1e11, 3e11, 1e12]

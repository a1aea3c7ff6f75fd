"""The policy-gradient core shared by classic RL and the language model's PPO, tested once."""

from __future__ import annotations

import math

import pytest
import torch

from chatfoundry.rl import core

G, LAM = 0.9, 0.8
GL = G * LAM  # 0.72


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


# ---------------------------------------------------------------- GAE by hand
# One 3-step episode: rewards 1, 1, 1; V(s_0..2) = 0.5, 0.4, 0.3.
#   delta_0 = 1 + 0.9 * 0.4 - 0.5 = 0.86,   delta_1 = 1 + 0.9 * 0.3 - 0.4 = 0.87


def test_gae_terminated_episode_uses_no_value_after_the_end():
    # delta_2 = 1 - 0.3 = 0.7 (terminated: V(s_3) = 99 must not count)
    # A_2 = 0.7, A_1 = 0.87 + 0.72 * 0.7 = 1.374, A_0 = 0.86 + 0.72 * 1.374 = 1.84928
    adv, ret = core.gae(t(1, 1, 1), t(0.5, 0.4, 0.3), t(0.4, 0.3, 99.0), terminated=t(0, 0, 1), done=t(0, 0, 1),
                        gamma=G, lam=LAM)
    torch.testing.assert_close(adv, t(1.84928, 1.374, 0.7))
    torch.testing.assert_close(ret, adv + t(0.5, 0.4, 0.3))


def test_gae_truncated_episode_bootstraps_from_the_final_observation():
    # V(final obs) = 2: delta_2 = 1 + 0.9 * 2 - 0.3 = 2.5; A_1 = 0.87 + 0.72 * 2.5 = 2.67; A_0 = 0.86 + 0.72 * 2.67 = 2.7824
    adv, _ = core.gae(t(1, 1, 1), t(0.5, 0.4, 0.3), t(0.4, 0.3, 2.0), terminated=t(0, 0, 0), done=t(0, 0, 1),
                      gamma=G, lam=LAM)
    torch.testing.assert_close(adv, t(2.7824, 2.67, 2.5))


def test_gae_stops_at_an_episode_boundary_inside_a_rollout():
    # episode 1 = steps 0-1 (terminated at 1), episode 2 starts at 2 and is cut by the rollout (V after = 1)
    # A_1 = 1 - 0.4 = 0.6; A_0 = 0.86 + 0.72 * 0.6 = 1.292; A_2 = 1 + 0.9 * 1 - 0.3 = 1.6
    adv, _ = core.gae(t(1, 1, 1), t(0.5, 0.4, 0.3), t(0.4, 7.0, 1.0), terminated=t(0, 1, 0), done=t(0, 1, 0),
                      gamma=G, lam=LAM)
    torch.testing.assert_close(adv, t(1.292, 0.6, 1.6))


def test_gae_padding_gets_zero_and_leaks_nothing():
    rewards = torch.tensor([[1.0, 1, 1, 1], [1, 1, 5, -3]])  # row 1: two real steps, then padding holding junk
    values = torch.tensor([[0.5, 0.4, 0.3, 0.2], [0.5, 0.4, 9, 9]])
    next_values = torch.tensor([[0.4, 0.3, 0.2, 0.0], [0.4, 8.0, 9, 9]])
    terminated = torch.tensor([[0.0, 0, 0, 1], [0, 1, 0, 0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = core.gae(rewards, values, next_values, terminated, terminated, G, LAM, mask)
    alone, alone_ret = core.gae(rewards[1, :2], values[1, :2], next_values[1, :2], terminated[1, :2], terminated[1, :2], G, LAM)
    torch.testing.assert_close(adv[1, :2], alone)  # 0.86 + 0.72 * 0.6, 0.6
    torch.testing.assert_close(adv[1, :2], t(1.292, 0.6))
    torch.testing.assert_close(ret[1, :2], alone_ret)
    assert adv[1, 2:].eq(0).all() and ret[1, 2:].eq(0).all()
    # a masked step passes nothing back even without a done flag before it
    adv2, _ = core.gae(rewards, values, next_values, terminated, torch.zeros_like(terminated), G, LAM, mask)
    torch.testing.assert_close(adv2[1, :2], t(0.86 + GL * 0.6, 0.6))


def test_gae_vector_env_reset_step_is_masked():
    # gymnasium NEXT_STEP autoreset: step 1 ends the episode (truncated, V(final) = 2), step 2 is the env
    # resetting (mask 0, its action ignored), step 3 starts the next episode
    rewards, values = t(1, 1, 0, 1), t(0.5, 0.4, 2.0, 0.3)
    next_values = t(0.4, 2.0, 0.3, 1.0)
    adv, _ = core.gae(rewards, values, next_values, t(0, 0, 0, 0), t(0, 1, 0, 0), G, LAM, t(1, 1, 0, 1))
    # A_1 = 1 + 0.9 * 2 - 0.4 = 2.4; A_0 = 0.86 + 0.72 * 2.4 = 2.588; A_3 = 1 + 0.9 - 0.3 = 1.6
    torch.testing.assert_close(adv, t(2.588, 2.4, 0.0, 1.6))


def test_gae_time_is_the_last_dimension_for_any_batch_shape():
    g = torch.Generator().manual_seed(0)
    r, v, nv = (torch.randn(2, 3, 6, generator=g) for _ in range(3))
    d = (torch.rand(2, 3, 6, generator=g) < 0.2).float()
    adv, _ = core.gae(r, v, nv, d, d, G, LAM)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(adv[i, j], core.gae(r[i, j], v[i, j], nv[i, j], d[i, j], d[i, j], G, LAM)[0])


def test_sequence_gae_is_the_lm_case():
    # two responses, right-padded: row 0 has 3 tokens, row 1 has 2; the score comes at the last token
    rewards = torch.tensor([[-0.1, -0.1, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.3, 0.4, 5.0], [0.1, 0.6, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = core.sequence_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: d = (-0.1 + 0.3 - 0.2, -0.1 + 0.4 - 0.3, 1 - 0.4) = (0, 0, 0.6); A = (0.15, 0.3, 0.6)
    # row 1: d = (0 + 0.6 - 0.1, 2 - 0.6) = (0.5, 1.4); A = (0.5 + 0.7, 1.4)
    torch.testing.assert_close(adv, torch.tensor([[0.15, 0.3, 0.6, 0.0], [1.2, 1.4, 0.0, 0.0]]))
    torch.testing.assert_close(ret, (adv + values) * mask)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_and_var_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    torch.testing.assert_close(core.masked_mean(x, mask), real.mean())
    torch.testing.assert_close(core.masked_var(x, mask), real.var(unbiased=True))
    torch.testing.assert_close(core.masked_var(x, mask, unbiased=False), real.var(unbiased=False))
    torch.testing.assert_close(core.masked_mean(x, mask, dim=1), torch.tensor([2.0, 4.5]))


def test_masked_whiten_uses_only_real_steps_and_zeroes_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = core.masked_whiten(x, mask)
    junk = x.clone()
    junk[mask == 0] = 1e6
    torch.testing.assert_close(core.masked_whiten(junk, mask), w)  # padding values do not matter
    assert w[mask == 0].eq(0).all()
    torch.testing.assert_close(core.masked_mean(w, mask), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(core.masked_var(w, mask), torch.tensor(1.0), atol=1e-5, rtol=0)
    kept = core.masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(core.masked_mean(kept, mask), torch.tensor(3.0))  # the mean stays
    plain = x[0, :3]
    torch.testing.assert_close(core.masked_whiten(plain), (plain - plain.mean()) / plain.std(), atol=1e-6, rtol=0)


def test_explained_variance():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert core.explained_variance(returns, returns) == pytest.approx(1.0)
    assert core.explained_variance(torch.full((4,), 2.5), returns) == pytest.approx(0.0)
    mask = torch.tensor([1, 1, 1, 0])
    assert core.explained_variance(torch.tensor([1.0, 2.0, 3.0, -9.0]), returns, mask) == pytest.approx(1.0)


# ---------------------------------------------------------------- losses


def test_clipped_surrogate_before_any_update_is_minus_the_mean_advantage():
    logp = torch.log(torch.tensor([0.2, 0.5, 0.9]))
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, stats = core.clipped_surrogate(logp, logp.clone(), adv, clip=0.2)
    torch.testing.assert_close(loss, -adv.mean())
    assert stats == {"clip_fraction": 0.0, "approx_kl": 0.0, "ratio": 1.0}


def test_clipped_surrogate_clips_and_stops_the_gradient_past_the_clip():
    logp_old = torch.zeros(4)
    logp_new = torch.log(torch.tensor([1.5, 1.1, 0.5, 0.9])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float32)
    loss, stats = core.clipped_surrogate(logp_new, logp_old, adv, clip=0.2)
    # min(rA, clip(r)A): 1.2 (clipped), 1.1, -0.8 (clipped: min(-0.5, -0.8)), -0.9
    torch.testing.assert_close(loss, -torch.tensor([1.2, 1.1, -0.8, -0.9]).mean())
    assert stats["clip_fraction"] == 0.5
    loss.backward()
    assert logp_new.grad[0] == 0 and logp_new.grad[2] == 0 and logp_new.grad[1] != 0 and logp_new.grad[3] != 0


def test_clipped_surrogate_ignores_padding():
    logp_old, adv = torch.zeros(2, 3), torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, _ = core.clipped_surrogate(logp_old.clone(), logp_old, adv, 0.2, mask)
    torch.testing.assert_close(loss, torch.tensor(-2.0))


def test_kl_penalty_surrogate():
    logp_old = torch.log(torch.tensor([0.5, 0.25]))
    adv = torch.tensor([1.0, 3.0])
    loss, stats = core.kl_penalty_surrogate(logp_old.clone(), logp_old, adv, beta=3.0)
    torch.testing.assert_close(loss, torch.tensor(-2.0))  # no KL yet
    assert stats["kl"] == 0.0 and stats["beta"] == 3.0
    logp_new = logp_old + torch.tensor([0.3, -0.2])
    loss, stats = core.kl_penalty_surrogate(logp_new, logp_old, adv, beta=3.0)
    r = torch.exp(torch.tensor([0.3, -0.2]))
    k3 = (r - 1) - torch.log(r)
    torch.testing.assert_close(loss, (-r * adv + 3.0 * k3).mean())
    assert stats["kl"] > 0


def test_clipped_value_loss():
    v_old, returns = torch.tensor([0.0, 0.0]), torch.tensor([1.0, -1.0])
    v_new = torch.tensor([0.5, 0.5])
    torch.testing.assert_close(core.clipped_value_loss(v_new, v_old, returns), torch.tensor((0.25 + 2.25) / 4))
    # clip 0.2: clipped values (0.2, 0.2); errors max((0.5-1)^2, (0.2-1)^2) = 0.64, max(2.25, 1.44) = 2.25
    torch.testing.assert_close(core.clipped_value_loss(v_new, v_old, returns, clip=0.2), torch.tensor((0.64 + 2.25) / 4))
    mask = torch.tensor([1, 0])
    torch.testing.assert_close(core.clipped_value_loss(v_new, v_old, returns, mask=mask), torch.tensor(0.125))


def test_kl_estimators_are_unbiased_or_close_and_k3_is_nonnegative():
    g = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    true_kl = (p * (p / q).log()).sum()
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[x], q.log()[x]
    assert core.kl_estimate(logp, logq, "k1").mean() == pytest.approx(true_kl.item(), rel=0.05)
    assert core.kl_estimate(logp, logq, "k3").mean() == pytest.approx(true_kl.item(), rel=0.05)
    assert core.kl_estimate(logp, logq, "k2").mean() == pytest.approx(true_kl.item(), rel=0.25)  # biased, close
    assert (core.kl_estimate(logp, logq, "k3") >= 0).all()
    with pytest.raises(ValueError):
        core.kl_estimate(logp, logq, "k4")


# ---------------------------------------------------------------- KL controllers


def test_fixed_kl_never_moves():
    c = core.FixedKL(0.1)
    assert c.update(5.0, 100) == 0.1 and c.update(0.0, 100) == 0.1


def test_adaptive_kl_moves_beta_toward_the_target_proportionally_and_capped():
    up = core.AdaptiveKL(value=0.1, target=6.0, horizon=10_000)
    assert up.update(observed_kl=12.0, n_steps=1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error capped at +0.2
    down = core.AdaptiveKL(value=0.1, target=6.0, horizon=10_000)
    assert down.update(observed_kl=5.4, n_steps=1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))  # error -0.1
    same = core.AdaptiveKL(value=0.1, target=6.0)
    assert same.update(6.0, 1000) == pytest.approx(0.1)



def test_adaptive_kl_holds_beta_until_the_target_is_first_reached():
    c = core.AdaptiveKL(value=0.1, target=6.0, horizon=1000, hold=True)
    assert c.update(0.0, 1000) == 0.1 and c.update(3.0, 1000) == 0.1  # the policy has not moved yet
    assert c.update(12.0, 1000) == pytest.approx(0.12)  # past the target: up by the capped 20%
    assert c.update(3.0, 1000) == pytest.approx(0.12 * 0.8)  # reached once: now it may fall
    free = core.AdaptiveKL(value=0.1, target=6.0, horizon=1000)  # Ziegler et al.'s form as it was
    assert free.update(0.0, 1000) == pytest.approx(0.08)


def test_doubling_kl_is_the_ppo_paper_rule():
    c = core.DoublingKL(value=1.0, target=0.01)
    assert c.update(0.02) == 2.0  # > 1.5 x target: double
    assert c.update(0.012) == 2.0  # within the band: keep
    assert c.update(0.005) == 1.0  # < target / 1.5: halve
    assert math.isclose(c.value, 1.0)

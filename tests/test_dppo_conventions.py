"""dppo_mask's options for the public DPPO conventions (issue 14, section 5; see
docs/conventions.md): asymmetric thresholds (delta_low / delta_high) and verl's A = 0
convention (zero_advantage="negative").

Three oracles: hand-computed cases; a transcription, written here, of verl 0.9.1's DPPO
mask formulas; and verl 0.9.1's own dppo_tv / dppo_kl losses, called directly (set
CPPO_NATIVE_SKIP_VERL=1 to skip that part deliberately)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cppo_native import cppo_mask
from cppo_native.baselines import dppo_mask


# ---------------------------------------------------------------------------------------
# Hand-computed cases. p = pi(y_t), q = mu(y_t); Binary TV D = |p - q|.

P = np.array([[0.50, 0.30, 0.20, 0.60, 0.10, 0.40]])
Q = np.array([[0.30, 0.50, 0.20, 0.35, 0.30, 0.40]])
# D:          0.20  0.20  0.00  0.25  0.20  0.00
A = np.array([[1.0, -1.0, 1.0, 1.0, 0.0, 0.0]])
# token 0: A > 0, p up by 0.20 (away)       token 1: A < 0, p down by 0.20 (away)
# token 2: no move                          token 3: A > 0, p up by 0.25 (away)
# token 4: A = 0, p down by 0.20            token 5: A = 0, no move


def _mask(**kw):
    return dppo_mask(np.log(P), np.log(Q), A, **kw)


def test_symmetric_is_the_plain_dppo_mask():
    assert _mask(delta=0.15).tolist() == [[False, False, True, False, True, True]]
    assert _mask(delta=0.21).tolist() == [[True, True, True, False, True, True]]


def test_asymmetric_thresholds_by_advantage_sign():
    # A > 0 tokens tested against delta_high, A < 0 tokens against delta_low.
    assert _mask(delta_low=0.15, delta_high=0.22).tolist() == [[True, False, True, False, True, True]]
    assert _mask(delta_low=0.22, delta_high=0.15).tolist() == [[False, True, True, False, True, True]]
    assert _mask(delta_low=0.22, delta_high=0.3).tolist() == [[True, True, True, True, True, True]]
    # delta is the default of the side not given
    assert _mask(delta=0.15, delta_high=0.22).tolist() == _mask(delta_low=0.15, delta_high=0.22).tolist()


def test_zero_advantage_negative_takes_the_low_branch():
    # verl: A = 0 is in the A < 0 branch, so token 4 (p down by 0.20) is tested against
    # delta_low; token 5 (no move) stays kept.
    assert _mask(delta=0.15, zero_advantage="negative").tolist() == [[False, False, True, False, False, True]]
    assert _mask(delta=0.21, zero_advantage="negative").tolist() == [[True, True, True, False, True, True]]
    assert _mask(delta_low=0.15, delta_high=0.3, zero_advantage="negative").tolist() == [
        [True, False, True, True, False, True]]


def test_torch_per_row_packed_and_errors():
    lp, lq = torch.tensor(np.log(P)), torch.tensor(np.log(Q))
    got = dppo_mask(lp, lq, torch.tensor(A), delta_low=0.15, delta_high=0.22, zero_advantage="negative")
    assert isinstance(got, torch.Tensor) and got.tolist() == [[True, False, True, False, False, True]]
    # per-row advantages and the packed layout go through unchanged
    per_row = dppo_mask(np.log(P), np.log(Q), np.array([-1.0]), delta_low=0.15, delta_high=0.3)
    assert per_row.tolist() == cppo_mask(np.log(P), np.log(Q), np.array([-1.0]), delta=0.15, delta_b=0.0,
                                         position_weight=False, prefix_budget=False).tolist()
    packed = dppo_mask(np.log(P[0]), np.log(Q[0]), A[0], cu_seqlens=np.array([0, 2, 6]), delta_low=0.15,
                       delta_high=0.22)
    assert packed.tolist() == [True, False, True, False, True, True]
    with pytest.raises(ValueError, match="advantages must be finite"):
        dppo_mask(np.log(P), np.log(Q), np.where(A == 1.0, np.nan, A), delta_low=0.1, delta_high=0.2)
    with pytest.raises(ValueError, match="zero_advantage"):
        _mask(delta=0.1, zero_advantage="positive")
    with pytest.raises(ValueError, match="needs delta"):
        _mask(delta_low=0.1)
    with pytest.raises(ValueError, match="return_info"):
        _mask(delta_low=0.1, delta_high=0.2, return_info=True)
    with pytest.raises(ValueError, match="delta must be > 0"):
        _mask(delta_low=0.0, delta_high=0.2)
    # symmetric with the spec's convention keeps the old behaviour, info included
    m, info = _mask(delta=0.15, return_info=True)
    assert m.tolist() == [[False, False, True, False, True, True]] and info.reason.tolist()[0][4] == 1


# ---------------------------------------------------------------------------------------
# A transcription of verl 0.9.1's DPPO masks (trainer/ppo/core_algos.py,
# compute_policy_loss_dppo_tv / _kl), written from the formulas, in the inputs' dtype.

def verl_dppo_tv_keep(lp, lq, adv, low, high):
    p, q = lp.exp(), lq.exp()
    return torch.where(adv > 0, (p - q) <= high, (p - q) >= -low)


def verl_binary_kl(lp, lq):
    p, q = lp.exp(), lq.exp()
    return q * (lq - lp) + (1 - q) * torch.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))


def verl_dppo_kl_keep(lp, lq, adv, low, high):
    p, q = lp.exp(), lq.exp()
    kl = verl_binary_kl(lp, lq)
    return torch.where(adv > 0, (kl <= high) | (p <= q), (kl <= low) | (p >= q))


def random_batch(seed, rows=16, cols=48):
    g = torch.Generator().manual_seed(seed)
    lq = torch.log(torch.rand(rows, cols, generator=g, dtype=torch.float64) * 0.97 + 0.02)
    lp = torch.clamp(lq + torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.5, max=-1e-3)
    adv = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    adv = torch.where(torch.rand(rows, cols, generator=g) < 0.2, torch.zeros_like(adv), adv)  # A = 0 tokens
    mask = torch.rand(rows, cols, generator=g) < 0.85
    return lp, lq, adv, mask


LOW, HIGH = 0.12, 0.28


def _away_from_threshold(d, lp, lq):
    # float64 inputs; move exact threshold ties out of the way (the spec's tie band)
    near = ((d - LOW).abs() < 1e-9) | ((d - HIGH).abs() < 1e-9)
    return torch.where(near, lq, lp)


@pytest.mark.parametrize("seed", range(4))
def test_matches_transcribed_verl_dppo_tv(seed):
    lp, lq, adv, mask = random_batch(seed)
    lp = _away_from_threshold((lp.exp() - lq.exp()).abs(), lp, lq)
    want = verl_dppo_tv_keep(lp, lq, adv, LOW, HIGH) & mask
    got = dppo_mask(lp, lq, adv, mask, delta_low=LOW, delta_high=HIGH, zero_advantage="negative")
    assert torch.equal(got, want)
    # the spec's convention differs exactly at A = 0 tokens
    spec = dppo_mask(lp, lq, adv, mask, delta_low=LOW, delta_high=HIGH)
    differ = spec != got
    assert bool((adv[differ] == 0).all()) and int(differ.sum()) > 0


@pytest.mark.parametrize("seed", range(4))
def test_matches_transcribed_verl_dppo_kl_with_its_divergence(seed):
    lp, lq, adv, mask = random_batch(seed)
    d = verl_binary_kl(lp, lq)
    lp = _away_from_threshold(d, lp, lq)
    d = verl_binary_kl(lp, lq).clamp(min=0.0)  # verl's 1e-8 formula, passed as D
    want = verl_dppo_kl_keep(lp, lq, adv, LOW, HIGH) & mask
    got = dppo_mask(lp, lq, adv, mask, delta_low=LOW, delta_high=HIGH, zero_advantage="negative", divergence=d)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------
# verl 0.9.1 itself.

def _verl_core_algos():
    if os.environ.get("CPPO_NATIVE_SKIP_VERL") == "1":
        pytest.skip("CPPO_NATIVE_SKIP_VERL=1")
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as exc:  # the test set-up installs verl: fail loudly
        raise ImportError("needs verl: pip install --no-deps verl==0.9.1 && pip install -e '.[verl-test]' "
                          f"(or set CPPO_NATIVE_SKIP_VERL=1). Import failed with: {exc}") from exc
    return core_algos


@pytest.mark.parametrize("loss_mode", ["dppo_tv", "dppo_kl"])
@pytest.mark.parametrize("seed", range(3))
def test_matches_verls_own_dppo_losses(loss_mode, seed):
    core_algos = _verl_core_algos()
    from omegaconf import OmegaConf

    config = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": LOW, "clip_ratio_high": HIGH,
                               "clip_ratio_c": 1e9, "global_batch_info": {}})
    lp, lq, adv, mask = random_batch(seed)
    d = verl_binary_kl(lp, lq) if loss_mode == "dppo_kl" else (lp.exp() - lq.exp()).abs()
    lp = _away_from_threshold(d, lp, lq)
    x = lp.clone().requires_grad_()
    loss, metrics = core_algos.get_policy_loss_fn(loss_mode)(
        old_log_prob=lq, log_prob=x, advantages=adv, response_mask=mask.to(torch.float64),
        loss_agg_mode="token-sum", config=config, rollout_is_weights=None)
    loss.backward()
    # token-sum: d loss / d lp_t = -A_t * rho_t * keep_t at valid tokens, so keep_t is
    # readable wherever A_t != 0; verl's pg_clipfrac counts A = 0 tokens too.
    rho = (lp - lq).exp()
    readable = mask & (adv != 0)
    verl_keep = (x.grad / (-adv * rho)).round()
    kw = dict(delta_low=LOW, delta_high=HIGH, zero_advantage="negative")
    if loss_mode == "dppo_kl":
        kw["divergence"] = verl_binary_kl(lp, lq).clamp(min=0.0)
    ours = dppo_mask(lp, lq, adv, mask, **kw)
    assert torch.equal(ours[readable], verl_keep[readable] == 1)
    masked_frac = float((mask & ~ours).sum()) / float(mask.sum())
    # verl divides by (count + 1e-8): equal to ~1e-10 relative for these counts
    assert metrics["actor/pg_clipfrac"] == pytest.approx(masked_frac, rel=1e-9)
    assert int((mask & ~ours & (adv == 0)).sum()) > 0  # the A = 0 convention was exercised


def test_unirl_toward_mu_recipe_from_conventions_doc():
    """docs/conventions.md: zeroing lp - lq where rho rounds to 1 in the input dtype (the
    peers' `A * (rho - 1) <= 0`) while passing the original D reproduces their test."""
    from cppo_native.divergence import binary_tv

    lq = torch.log(torch.tensor([[0.30, 0.40, 0.50, 0.60]], dtype=torch.float32))
    lp = lq.clone()
    lp[0, 0] = torch.log(torch.tensor(0.55))     # a big move away: exhausts the budget, c_t < 0 after it
    lp[0, 2] = torch.nextafter(lq[0, 2], torch.tensor(0.0))  # one ulp up: rho rounds to 1 in float32
    adv = torch.ones(1)
    assert float(torch.exp(lp - lq)[0, 2]) == 1.0 and float(lp[0, 2] - lq[0, 2]) > 0
    kw = dict(delta=0.15, delta_b=0.02)
    spec = cppo_mask(lp, lq, adv, **kw)
    assert not bool(spec[0, 2])  # the spec: moving away (by one ulp) and over budget
    lp_for_sign = torch.where(torch.exp(lp - lq) == 1, lq, lp)
    peer = cppo_mask(lp_for_sign, lq, adv, divergence=binary_tv(lp, lq), **kw)
    assert bool(peer[0, 2]) and torch.equal(peer[:, [0, 1, 3]], spec[:, [0, 1, 3]])

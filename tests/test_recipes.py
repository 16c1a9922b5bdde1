"""docs/trainers.md: the cppo_native side of each recipe, on synthetic tensors laid out as
the framework lays them out. None of slime, NeMo-RL, AReaL, ROLL or prime-rl is
imported: none installs from PyPI with a cheaply importable loss (slime, nemo-rl, roll:
the PyPI names are other projects or placeholders; prime-rl is not on PyPI; areal 1.0.4
is, but its loss module imports its whole API, aiohttp and more). The layouts are
written here from the frameworks' public source, as docs/trainers.md cites it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cppo_native import cppo_mask
from cppo_native.baselines import dppo_mask
from cppo_native.torch import cppo_policy_loss, masked_policy_loss

KNOBS = dict(delta=0.15, delta_b=0.02, w_min=0.8)


def sequences(seed, n=5, max_len=40):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, max_len, (1,), generator=g))
        mu = torch.log(torch.rand(length, generator=g, dtype=torch.float64) * 0.9 + 0.05)
        lp = torch.clamp(mu + 0.5 * torch.randn(length, generator=g, dtype=torch.float64), max=-1e-4)
        adv = torch.full((length,), float(torch.randn(1, generator=g)), dtype=torch.float64)
        mask = torch.rand(length, generator=g) < 0.9
        out.append((lp, mu, adv, mask))
    return out


def padded(seqs):
    L = max(len(s[0]) for s in seqs)
    def pad(i, fill):
        return torch.stack([torch.cat([s[i], torch.full((L - len(s[i]),), fill, dtype=s[i].dtype)]) for s in seqs])
    return pad(0, 0.0), pad(1, 0.0), pad(2, 0.0), pad(3, False)


# ---------------------------------------------------------------------------------------
# slime: each sample's response is split over context-parallel ranks in the zigzag
# pattern (slime/backends/megatron_utils/cp_utils.py): the sequence (prompt + response)
# is cut into 2 * cp chunks of ceil(total / (2 cp)) tokens; rank r holds chunks r and
# 2 cp - 1 - r. Log-prob i of the response belongs to sequence position prompt - 1 + i.

def zigzag_indices(total, response, cp, rank):
    chunk = -(-total // (2 * cp))
    prompt = total - response
    owned = []
    for c in (rank, 2 * cp - 1 - rank):
        lo, hi = max(c * chunk, prompt - 1), min((c + 1) * chunk, total - 1)
        owned.extend(range(lo - (prompt - 1), hi - (prompt - 1)))
    return torch.tensor(owned, dtype=torch.long)


@pytest.mark.parametrize("cp", [2, 4])
def test_slime_gather_mask_then_slice_equals_full_sequence(cp):
    seqs = sequences(1, n=4, max_len=60)
    prompts = [7, 3, 12, 1]
    for (lp, mu, adv, mask), prompt in zip(seqs, prompts):
        total, response = prompt + len(lp), len(lp)
        parts = [zigzag_indices(total, response, cp, r) for r in range(cp)]
        assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(response))  # a partition
        # the recipe: gather per sequence (all_gather_with_cp), mask, slice back
        # (slice_log_prob_with_cp); here the gather is the full tensor itself
        keep_full = cppo_mask(lp[None], mu[None], adv[None], mask[None], **KNOBS)[0]
        total_loss = 0.0
        for idx in parts:
            _, loss_mat = masked_policy_loss(lp[idx][None], mu[idx][None], adv[idx][None], mask[idx][None],
                                             keep_full[idx][None])
            total_loss += float(loss_mat.sum())
        want, _ = cppo_policy_loss(lp[None], mu[None], adv[None], mask[None], loss_agg_mode="token-sum", **KNOBS)
        assert total_loss == pytest.approx(float(want), rel=1e-12, abs=1e-12)


def test_slime_mask_on_local_shards_alone_is_wrong():
    # why the recipe gathers: the prefix budget needs every earlier token of the sequence
    n = 120  # every token moves away from mu by D = 0.05: within delta, over the budget soon
    mu = torch.full((n,), math.log(0.30), dtype=torch.float64)
    lp = torch.full((n,), math.log(0.35), dtype=torch.float64)
    adv, mask = torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.bool)
    keep_full = cppo_mask(lp[None], mu[None], adv[None], mask[None], **KNOBS)[0]
    idx = zigzag_indices(len(lp) + 5, len(lp), 2, 1)
    local = cppo_mask(lp[idx][None], mu[idx][None], adv[idx][None], mask[idx][None], **KNOBS)[0]
    assert not bool(keep_full[idx].any())  # the full sequence's budget is spent before rank 1's tokens
    assert bool(local.any())  # a shard alone starts with a fresh budget


# ---------------------------------------------------------------------------------------
# AReaL: grpo_loss_fn receives packed 1-D tensors with input_data["cu_seqlens"];
# mu = input_data["logprobs"] (the inference engine's), per-token advantages.

def test_areal_packed_cu_seqlens_equals_padded():
    seqs = sequences(2, n=6)
    lp = torch.cat([s[0] for s in seqs])
    mu = torch.cat([s[1] for s in seqs])
    adv = torch.cat([s[2] for s in seqs])
    mask = torch.cat([s[3] for s in seqs])
    cu = torch.tensor([0] + list(np.cumsum([len(s[0]) for s in seqs])), dtype=torch.int32)
    keep = cppo_mask(lp.detach(), mu, adv, mask, cu_seqlens=cu, **KNOBS)  # the recipe's call
    x = lp.clone().requires_grad_()
    loss, _ = masked_policy_loss(x[None], mu[None], adv[None], mask[None], keep[None], loss_agg_mode="token-mean")
    loss.backward()
    P = padded(seqs)
    xp = P[0].clone().requires_grad_()
    want, _ = cppo_policy_loss(xp, P[1], P[2], P[3], loss_agg_mode="token-mean", **KNOBS)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    grad_padded = torch.cat([xp.grad[i, : len(s[0])] for i, s in enumerate(seqs)])
    torch.testing.assert_close(x.grad, grad_padded, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------
# NeMo-RL (ClippedPGLossFn.__call__) and ROLL (ActorWorker.loss_func): padded [B, S]
# tensors, next-token shift [:, 1:]; NeMo: mask = token_mask[:, 1:] * sample_mask[:, None],
# mu = generation_logprobs[:, 1:], token-level loss = sum / global_valid_toks.

def test_nemo_rl_shifted_layout_and_global_normalisation():
    seqs = sequences(3, n=4)
    lp, mu, adv, tok = padded(seqs)
    B, L = lp.shape
    # NeMo's tensors have one extra leading column (the first token has no log-prob)
    full = lambda x, fill: torch.cat([torch.full((B, 1), fill, dtype=x.dtype), x], dim=1)  # noqa: E731
    data = {"generation_logprobs": full(mu, 0.0), "advantages": full(adv, 0.0), "token_mask": full(tok, False),
            "sample_mask": torch.tensor([1, 1, 0, 1], dtype=torch.float64)}
    global_valid_toks = torch.tensor(4.0 * float(tok.sum()))  # e.g. four data-parallel ranks
    next_token_logprobs = lp.clone().requires_grad_()
    # the recipe
    mask = data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)
    loss, m = cppo_policy_loss(next_token_logprobs, data["generation_logprobs"][:, 1:], data["advantages"][:, 1:],
                               mask, loss_agg_mode="token-mean", batch_num_tokens=global_valid_toks, **KNOBS)
    # NeMo's masked_mean(x, mask, global_normalization_factor=g) is sum(x * mask) / g
    keep = cppo_mask(lp, mu, adv, mask, **KNOBS)
    _, loss_mat = masked_policy_loss(lp, mu, adv, mask, keep)
    assert loss.item() == pytest.approx(float((loss_mat * mask).sum() / global_valid_toks), rel=1e-12)
    assert m["num_valid_tokens"] == float(mask.sum())


# ---------------------------------------------------------------------------------------
# prime-rl: a custom loss is `fn(inputs: LossInputs, **kwargs) -> LossOutputs`, one sample
# at a time, 1-D tensors; mu = inputs.inference_logprobs; the loss is a sum (normalised
# by the trainer). Its default loss is DPPO-Binary-TV with dppo_mask_low/high, A = 0 in
# the low branch.

def prime_rl_default_keep(lp, mu, adv, loss_mask, low, high):
    diff = lp.exp() - mu.exp()
    masked = torch.where(adv > 0, diff > high, diff < -low)
    return loss_mask & ~masked


def test_prime_rl_per_sample_loss_and_its_dppo_default():
    for lp, mu, adv, mask in sequences(5, n=4):
        adv = torch.where(torch.arange(len(adv)) % 5 == 0, torch.zeros_like(adv), adv)
        # the recipe's per-sample body: a [1, L] row through cppo_policy_loss, summed
        x = lp.clone().requires_grad_()
        loss, _ = cppo_policy_loss(x[None], mu[None], adv[None], mask[None], loss_agg_mode="token-sum",
                                   clip_ratio_c=math.inf, **KNOBS)
        loss.backward()
        keep = cppo_mask(lp[None], mu[None], adv[None], mask[None], **KNOBS)[0]
        torch.testing.assert_close(x.grad, torch.where(keep, -adv * (lp - mu).exp(), torch.zeros_like(lp)))
        # prime-rl's default mask is dppo_mask with its thresholds and A = 0 -> low branch
        ours = dppo_mask(lp[None], mu[None], adv[None], mask[None], delta_low=0.2, delta_high=0.3,
                         zero_advantage="negative")[0]
        assert torch.equal(ours, prime_rl_default_keep(lp, mu, adv, mask, 0.2, 0.3))

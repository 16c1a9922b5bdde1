"""The torch backend (``backend="torch"``): the CPPO mask in float64 torch operations.

Chosen explicitly, never as a fallback. It runs on whatever device the tensors live on
(CPU, CUDA), follows ``docs/semantics.md`` step by step and is held to the spec's
tolerance rule against the reference (masks and reasons agree except where
|Z_t - c_t| <= 1e-9; thresholds, gates and row budgets to 1e-12): torch's ``exp``/``log``
may differ from the C library's in the last bit, and on CUDA ``cumsum`` sums in another
order.

Layouts: a padded ``[B, L]`` batch is computed in place; a packed batch (``cu_seqlens``)
is scattered into ``[B, max segment length]``, computed the same way and gathered back.
Host reads: the packed layout reads ``cu_seqlens`` (B + 1 integers) once, to check the
offsets and size the padded view; ``validate=True`` reads one small tensor (the first
bad position, its field and value). With ``validate=False`` a padded batch runs without
any host synchronisation.
"""

from __future__ import annotations

import math

import numpy as np

from .._core.codes import (
    INVALID,
    KEPT_TOWARD_MU,
    KEPT_WITHIN_THRESHOLD,
    MASKED_PREFIX_BUDGET,
    MASKED_TOKEN_THRESHOLD,
)
from .._core.errors import LOG_PROB_TOLERANCE, bad_value_error
from .._core.params import BINARY_KL_EPS, MaskParams
from .arrays import Prepared, _torch, check_offsets

_U64 = 1 << 64


def _signed(u: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no full uint64 math)."""
    u %= _U64
    return u - _U64 if u >= 1 << 63 else u


# SplitMix64 constants (reference.SplitMix64), as int64 bit patterns.
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_ROW_MULT = _signed(0xD1B54A32D192ED03)


def _shr(z, s: int):
    """Logical right shift of int64 bit patterns (``>>`` is arithmetic on int64)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(state):
    """SplitMix64 output for a state (int64 bit patterns; multiplication wraps)."""
    z = state
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _umod(z, m):
    """(z as uint64) mod m for int64 bit patterns z and 0 < m < 2**62."""
    t = _torch()
    low = t.remainder(z & ((1 << 63) - 1), m)  # the low 63 bits
    top = t.remainder(t.remainder(t.full_like(m, 1 << 62), m) * 2, m)  # 2**63 mod m
    return t.where(z < 0, t.remainder(low + top, m), low)


def shuffle_permutations(counts, seed: int, width: int, rows, row_offset: int = 0):
    """Fisher-Yates permutations ``[B, width]`` of range(n_r) for every row, driven by
    SplitMix64(seed, row, row_offset) exactly as ``reference.shuffle_permutation``: the
    draws are computed for all rows at once; the swaps run as ``width - 1`` vectorised
    steps."""
    t = _torch()
    dev = counts.device
    b = counts.shape[0]
    perm = t.arange(width, device=dev, dtype=t.int64).expand(b, width).clone()
    if width < 2 or b == 0:
        return perm
    state0 = (rows.to(t.int64) + _signed(row_offset + 1)) * _ROW_MULT ^ _signed(seed)  # [B], wrapping
    cols = t.arange(width, device=dev, dtype=t.int64)
    k = counts[:, None] - cols[None, :]  # draw number (1-based) of the step with i = col
    draws = _mix(state0[:, None] + k * _GOLDEN)
    j_all = _umod(draws, (cols + 1).expand(b, width))
    for i in range(width - 1, 0, -1):
        active = i < counts  # rows with i <= n - 1
        j = t.where(active, j_all[:, i], t.full_like(counts, i))[:, None]
        pi, pj = perm[:, i : i + 1].clone(), perm.gather(1, j)
        perm.scatter_(1, j, pi)
        perm[:, i : i + 1] = pj
    return perm


def _shuffle_weights(weight, valid, seed: int, rows, row_offset: int = 0):
    """Permute each row's weights among its valid positions (reference semantics)."""
    t = _torch()
    b, width = weight.shape
    counts = valid.sum(-1)
    rank = (valid.cumsum(-1) - 1).clamp(min=0)  # rank of a valid position in its row
    # The weights of valid positions, compacted in column order (invalid ones go to a
    # spare last slot), then read back through the permutation of ranks.
    base = t.zeros((b, width + 1), dtype=weight.dtype, device=weight.device)
    base.scatter_(1, t.where(valid, rank, t.full_like(rank, width)), weight)
    perm = shuffle_permutations(counts, seed, width, rows, row_offset)
    shuffled = base.gather(1, perm.gather(1, rank))
    return t.where(valid, shuffled, weight)


def _divergence(params: MaskParams, lp, lq, div):
    t = _torch()
    if params.divergence == "binary_tv":
        return (lp.exp() - lq.exp()).abs()
    if params.divergence == "binary_kl":
        a = lq.clamp(max=0.0)
        b = lp.clamp(max=0.0)
        p = a.exp()
        p_rest = (-t.expm1(a)).clamp(min=BINARY_KL_EPS)
        r_rest = (-t.expm1(b)).clamp(min=BINARY_KL_EPS)
        return (p * (a - b) + p_rest * t.log(p_rest / r_rest)).clamp(min=0.0)
    return div.to(t.float64)


def _row_budget(params: MaskParams, d, valid):
    """delta_b_row (paper Eq. 22) with the spec's quantile formula, evaluated as written."""
    t = _torch()
    b = d.shape[0]
    fixed = t.full((b,), params.delta_b, dtype=t.float64, device=d.device)
    if not params.adaptive_budget or d.shape[1] == 0:
        return fixed
    n = valid.sum(-1)
    srt = t.where(valid, d, math.inf).sort(-1).values
    h = params.budget_quantile * (n - 1).to(t.float64)
    lo = h.floor()
    hi = h.ceil()
    x_lo = srt.gather(1, lo.clamp(min=0).to(t.int64)[:, None])[:, 0]
    x_hi = srt.gather(1, hi.clamp(min=0).to(t.int64)[:, None])[:, 0]
    q = x_lo + (h - lo) * (x_hi - x_lo)
    budget = (params.budget_scale * q).clamp(min=params.delta_b).clamp(max=params.budget_ceiling * params.delta_b)
    return t.where(n > 0, budget, fixed)


def mask_padded(lp, lq, adv, valid, div, params: MaskParams, rows=None, row_offset: int = 0):
    """The mask pass over padded ``[B, L]`` tensors (no checks, no host reads).

    ``adv`` is ``[B, L]`` or ``[B, 1]``; ``valid`` bool ``[B, L]``; ``div`` the given D or
    None; ``rows`` the row index of each row (for the shuffle seed; default 0..B-1),
    counted from ``row_offset`` (the index of row 0 in a larger input).
    Returns ``(mask, reason, threshold, gate, row_budget)``."""
    t = _torch()
    f64 = t.float64
    b, width = lp.shape
    dev = lp.device
    lp = lp.to(f64)
    lq = lq.to(f64)
    adv = adv.to(f64)
    zero = t.zeros((), dtype=f64, device=dev)

    # 1. Position weight w_t (Eq. 9); T per row ("sequence") or one T for all.
    col = t.arange(width, device=dev, dtype=f64)
    if params.position_weight == "none":
        weight = t.ones((b, width), dtype=f64, device=dev)
    else:
        if params.horizon > 0:
            horizon = t.full((b, 1), float(params.horizon), dtype=f64, device=dev)
        else:
            last = t.where(valid, col + 1, zero).amax(-1, keepdim=True) if width else t.zeros((b, 1), dtype=f64, device=dev)
            horizon = last
        frac = (col / (horizon - 1)).clamp(max=1.0)
        weight = t.where(horizon > 1, 1.0 - (1.0 - params.w_min) * frac, t.ones((), dtype=f64, device=dev))
        if params.position_weight == "shuffled":
            if rows is None:
                rows = t.arange(b, device=dev)
            weight = _shuffle_weights(weight, valid, params.shuffle_seed, rows, row_offset)

    # Token divergence D_t (0 at invalid positions, whatever they hold).
    d = t.where(valid, _divergence(params, lp, lq, div), zero)

    # 2. Per-row budget (Eq. 22).
    row_budget = _row_budget(params, d, valid)

    # 3. Prefix sums S_{t-1}, W_{t-1} over every valid token, and c_t (Eq. 8).
    z = t.where(valid, weight * d, zero)
    w_valid = t.where(valid, weight, zero)
    pad = t.zeros((b, 1), dtype=f64, device=dev)
    s_prev = t.cat([pad, z.cumsum(-1)], dim=-1)[:, :width]
    w_prev = t.cat([pad, w_valid.cumsum(-1)], dim=-1)[:, :width]
    budget = row_budget[:, None]
    if params.prefix_budget:
        threshold = (params.delta + budget * w_prev - s_prev).clamp(max=params.delta)
    else:
        threshold = t.full((b, width), params.delta, dtype=f64, device=dev)

    # 4. Keep rule (Eq. 10) and reason codes; the first matching line applies.
    toward = adv * (lp - lq) <= 0.0
    within = z <= threshold
    code = lambda c: t.tensor(c, dtype=t.int8, device=dev)  # noqa: E731
    reason = t.where(z > params.delta, code(MASKED_TOKEN_THRESHOLD), code(MASKED_PREFIX_BUDGET))
    reason = t.where(within, code(KEPT_WITHIN_THRESHOLD), reason)
    reason = t.where(toward, code(KEPT_TOWARD_MU), reason)
    reason = t.where(valid, reason, code(INVALID))
    mask = valid & (toward | within)

    # 5. Soft gate (Appendix C): x_t = max(Z_t / delta, S_t / (delta + delta_b_row W_{t-1})).
    x = z / params.delta
    if params.prefix_budget:
        x = t.maximum(x, (s_prev + z) / (params.delta + budget * w_prev))
    one = t.ones((), dtype=f64, device=dev)
    gate = t.where(x <= 1.0, one, 1.0 / x)
    gate = t.where(toward, one, gate)
    gate = t.where(valid, gate, zero)
    return mask, reason, threshold, gate, row_budget


# ---------------------------------------------------------------------------------------
# Bad input: the first offending valid position, one host read.


def _first_bad(lp, lq, adv_tokens, valid, div):
    """``None`` or ``(flat position, field, value)`` of the first valid position breaking
    a rule, fields in the order lp, lq, A, D; one host read."""
    t = _torch()
    f64 = t.float64
    n = lp.numel()
    if n == 0:
        return None
    fields = [lp.reshape(-1).to(f64), lq.reshape(-1).to(f64), adv_tokens.reshape(-1).to(f64)]
    bad = [
        ~(t.isfinite(fields[0]) & (fields[0] <= LOG_PROB_TOLERANCE)),
        ~(t.isfinite(fields[1]) & (fields[1] <= LOG_PROB_TOLERANCE)),
        ~t.isfinite(fields[2]),
    ]
    if div is not None:
        fields.append(div.reshape(-1).to(f64))
        bad.append(~(t.isfinite(fields[3]) & (fields[3] >= 0.0)))
    bad_t = t.stack(bad) & valid.reshape(1, -1)
    any_bad = bad_t.any(0)
    idx = t.arange(n, device=lp.device)
    pos = t.where(any_bad, idx, n).min()
    at = pos.clamp(max=n - 1)
    field = bad_t[:, at].to(t.int8).argmax()  # first field broken there
    value = t.stack(fields)[field, at]
    host = t.stack([pos.to(f64), field.to(f64), value]).tolist()
    if int(host[0]) >= n:
        return None
    return int(host[0]), int(host[1]), host[2]


def compute(prep: Prepared, params: MaskParams, return_info: bool, validate: bool, row_offset: int = 0):
    """``(mask, reason, threshold, gate, row_budget, counts)`` as torch tensors on the
    inputs' device, shaped like the token arrays (info computed in any case: it is the
    same pass). ``row_offset``: the index of the first row in a larger input (seeds the
    shuffled ablation as the CPU backend's ``first_row`` does)."""
    t = _torch()
    lp, lq = prep.log_probs, prep.old_log_probs
    dev = lp.device
    valid = t.ones(lp.shape, dtype=t.bool, device=dev) if prep.valid is None else prep.valid != 0
    adv = prep.advantages
    div = prep.divergence if params.divergence == "given" else None

    if prep.cu_seqlens is None:
        b, width = lp.shape
        adv_tokens = adv[:, None].expand(b, width) if prep.advantage_per_row else adv
        if validate:
            bad = _first_bad(lp, lq, adv_tokens, valid, div)
            if bad is not None:
                pos, field, value = bad
                raise bad_value_error(field, pos // width, pos % width, value)
        mask, reason, threshold, gate, row_budget = mask_padded(
            lp, lq, adv[:, None] if prep.advantage_per_row else adv, valid, div, params, row_offset=row_offset
        )
    else:
        cu = check_offsets(prep.cu_seqlens.detach().cpu().numpy(), lp.shape[0])  # host read
        lengths = np.diff(cu)
        b, n = len(lengths), int(cu[-1])
        width = int(lengths.max()) if b else 0
        row_of = t.repeat_interleave(t.arange(b, device=dev), t.as_tensor(lengths, device=dev), output_size=n)
        col_of = t.arange(n, device=dev) - t.as_tensor(cu[:-1], device=dev)[row_of]
        adv_tokens = adv[row_of] if prep.advantage_per_row else adv
        if validate:
            bad = _first_bad(lp, lq, adv_tokens, valid, div)
            if bad is not None:
                pos, field, value = bad
                row = int(np.searchsorted(cu, pos, side="right")) - 1
                raise bad_value_error(field, row, pos - int(cu[row]), value, pos)

        def padded(x, fill):
            out = t.full((b, width), fill, dtype=x.dtype, device=dev)
            out[row_of, col_of] = x
            return out

        mask_p, reason_p, threshold_p, gate_p, row_budget = mask_padded(
            padded(lp, 0), padded(lq, 0), adv[:, None] if prep.advantage_per_row else padded(adv, 0),
            padded(valid, False), None if div is None else padded(div, 0), params, row_offset=row_offset,
        )
        mask, reason = mask_p[row_of, col_of], reason_p[row_of, col_of]
        threshold, gate = threshold_p[row_of, col_of], gate_p[row_of, col_of]

    if not return_info:
        return mask, None, None, None, None, None
    counts = t.bincount(reason.reshape(-1).to(t.int64), minlength=5)
    return mask, reason, threshold, gate, row_budget, counts

"""Plain NumPy/Python reference of the CPPO mask: the oracle for every backend.

It mirrors ``docs/semantics.md`` (the spec of arXiv 2606.10968) line by line with readable loops, scalar float64
arithmetic and the C library's ``exp``/``log`` (through :mod:`math`), so that the Rust
backend, which calls the same C functions in the same order, matches it bit for bit.
It is slow (a Python loop per token) and meant for tests and small inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ._core.codes import KEPT_TOWARD_MU
from ._core.codes import KEPT_WITHIN_THRESHOLD as KEPT_WITHIN
from ._core.codes import MASKED_PREFIX_BUDGET as MASKED_PREFIX
from ._core.codes import MASKED_TOKEN_THRESHOLD as MASKED_TOKEN
from ._core.errors import LOG_PROB_TOLERANCE, TOPK_EPS, bad_value_error
from ._core.errors import topk_error as _topk_error
from ._core.params import BINARY_KL_EPS, MaskParams, divergence_array, make_params

_U64 = (1 << 64) - 1


@dataclass
class ReferenceResult:
    mask: np.ndarray  # bool, input shape
    reason: np.ndarray  # int8, input shape
    threshold: np.ndarray  # float64, c_t
    gate: np.ndarray  # float64, soft-gate value
    row_budget: np.ndarray  # float64 [B], delta_b_row
    weighted_divergence: np.ndarray  # float64, Z_t = v_t w_t D_t (for tolerance checks)


def position_weight(column: int, horizon: int, w_min: float) -> float:
    """Paper Eq. 9 with t - 1 = column (0-based) and T = horizon."""
    if horizon <= 1:
        return 1.0
    return 1.0 - (1.0 - w_min) * min(1.0, column / (horizon - 1))


class SplitMix64:
    """The shuffled ablation's generator (same constants in Rust and CUDA), seeded for
    row ``row`` of a call whose first row has index ``row_offset`` in the input:
    ``seed ^ (row_offset + row + 1) * 0xD1B54A32D192ED03`` (mod 2**64)."""

    def __init__(self, seed: int, row: int, row_offset: int = 0):
        self.state = (seed ^ (((row_offset + row + 1) * 0xD1B54A32D192ED03) & _U64)) & _U64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _U64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
        return z ^ (z >> 31)


def shuffle_permutation(n: int, seed: int, row: int, row_offset: int = 0) -> list[int]:
    """Fisher-Yates permutation of range(n) driven by SplitMix64(seed, row, row_offset)."""
    perm = list(range(n))
    rng = SplitMix64(seed, row, row_offset)
    for i in range(n - 1, 0, -1):
        j = rng.next() % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def binary_tv(lp: float, lq: float) -> float:
    """|pi(y) - mu(y)| over {sampled token, rest}."""
    return abs(math.exp(lp) - math.exp(lq))


def _log1m_exp(x: float) -> float:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -ln 2."""
    if x > -0.6931471805599453:
        return math.log(-math.expm1(x)) if x < 0 else -math.inf
    return math.log1p(-math.exp(x))


def binary_kl(lp: float, lq: float) -> float:
    """KL(mu || pi) over {sampled token, rest}, with p = mu(y), r = pi(y).

    Log-probs are clamped to <= 0 (the validator tolerates +1e-6) and the rest-masses
    1 - p and 1 - r are floored at ``BINARY_KL_EPS`` so that a log-prob that rounds to
    0.0 gives a finite divergence.
    """
    a = min(lq, 0.0)
    b = min(lp, 0.0)
    p = math.exp(a)
    p_rest = max(-math.expm1(a), BINARY_KL_EPS)
    r_rest = max(-math.expm1(b), BINARY_KL_EPS)
    d = p * (a - b) + p_rest * math.log(p_rest / r_rest)
    return d if d > 0.0 else 0.0


def quantile_linear(sorted_values: list[float], q: float) -> float:
    """Spec's quantile: h = q (n-1), Q = x[floor h] + (h - floor h)(x[ceil h] - x[floor h])."""
    n = len(sorted_values)
    h = q * (n - 1)
    lo = math.floor(h)
    hi = math.ceil(h)
    return sorted_values[lo] + (h - lo) * (sorted_values[hi] - sorted_values[lo])


def _rows(shape: tuple[int, ...], cu_seqlens: np.ndarray | None) -> list[tuple[int, int]]:
    """(start, length) of each row in the flattened arrays."""
    if cu_seqlens is None:
        b, l = shape
        return [(r * l, l) for r in range(b)]
    return [(int(cu_seqlens[r]), int(cu_seqlens[r + 1] - cu_seqlens[r])) for r in range(len(cu_seqlens) - 1)]


def cppo_mask_reference(
    log_probs: Any,
    old_log_probs: Any,
    advantages: Any,
    response_mask: Any = None,
    *,
    delta: float,
    delta_b: float,
    w_min: float = 0.8,
    horizon: int | str = "sequence",
    adaptive_budget: bool = False,
    budget_quantile: float = 0.9,
    budget_scale: float = 1.0,
    budget_ceiling: float = 2.0,
    position_weight: bool | str = True,
    shuffle_seed: int = 0,
    prefix_budget: bool = True,
    divergence: Any = None,
    cu_seqlens: Any = None,
    per_row_advantages: bool | None = None,
    row_offset: int = 0,
) -> ReferenceResult:
    """Reference CPPO mask over NumPy inputs; same arguments as :func:`cppo_native.cppo_mask`,
    and ``row_offset``: the index of the first row in a larger input (the shuffled
    ablation seeds row r as row ``row_offset + r``; errors name r)."""
    div_array = None if divergence_array(divergence) is None else np.asarray(divergence)
    params = make_params(
        delta=delta,
        delta_b=delta_b,
        w_min=w_min,
        horizon=horizon,
        adaptive_budget=adaptive_budget,
        budget_quantile=budget_quantile,
        budget_scale=budget_scale,
        budget_ceiling=budget_ceiling,
        position_weight=position_weight,
        shuffle_seed=shuffle_seed,
        prefix_budget=prefix_budget,
        divergence=divergence,
    )
    lp = np.asarray(log_probs)
    shape = lp.shape
    lq = np.asarray(old_log_probs)
    valid = np.ones(shape, dtype=bool) if response_mask is None else np.asarray(response_mask) != 0
    cu = None if cu_seqlens is None else np.asarray(cu_seqlens, dtype=np.int64)
    rows = _rows(shape, cu)
    adv = np.asarray(advantages)
    # Same rule as the public API: the log-probs' shape means per token, else [B] (or
    # [B, 1] when padded) means one advantage per row.
    per_row_adv = adv.shape != shape if per_row_advantages is None else per_row_advantages
    if per_row_adv and adv.ndim == 2:
        adv = adv[:, 0]

    flat = lambda a: np.ascontiguousarray(a).reshape(-1)  # noqa: E731
    lp_f, lq_f, v_f = flat(lp), flat(lq), flat(valid)
    adv_f = flat(adv)
    d_f = None if div_array is None else flat(div_array)
    out_mask = np.zeros(lp_f.shape, dtype=bool)
    out_reason = np.zeros(lp_f.shape, dtype=np.int8)
    out_threshold = np.zeros(lp_f.shape, dtype=np.float64)
    out_gate = np.zeros(lp_f.shape, dtype=np.float64)
    row_budget = np.zeros(len(rows), dtype=np.float64)
    out_z = np.zeros(lp_f.shape, dtype=np.float64)

    for r, (start, length) in enumerate(rows):
        _reference_row(
            params, r, start, length, lp_f, lq_f, adv_f, per_row_adv, v_f, d_f,
            out_mask, out_reason, out_threshold, out_gate, row_budget, out_z, packed=cu is not None,
            row_offset=row_offset,
        )
    return ReferenceResult(
        out_mask.reshape(shape),
        out_reason.reshape(shape),
        out_threshold.reshape(shape),
        out_gate.reshape(shape),
        row_budget,
        out_z.reshape(shape),
    )


def _reference_row(p: MaskParams, r, start, length, lp_f, lq_f, adv_f, per_row_adv, v_f, d_f,
                   out_mask, out_reason, out_threshold, out_gate, row_budget, out_z, packed,
                   row_offset: int = 0) -> None:
    valid = [bool(v_f[start + c]) for c in range(length)]
    valid_cols = [c for c in range(length) if valid[c]]

    # Bad input: the first offending valid position, fields in spec order.
    def adv_at(c: int) -> float:
        return float(adv_f[r] if per_row_adv else adv_f[start + c])

    for c in valid_cols:
        i = start + c
        where = dict(row=r, column=c, flat=i if packed else None)
        for field, value in ((0, float(lp_f[i])), (1, float(lq_f[i]))):
            if not (math.isfinite(value) and value <= LOG_PROB_TOLERANCE):
                raise bad_value_error(field, value=value, **where)
        if not math.isfinite(adv_at(c)):
            raise bad_value_error(2, value=adv_at(c), **where)
        if d_f is not None:
            value = float(d_f[i])
            if not (math.isfinite(value) and value >= 0.0):
                raise bad_value_error(3, value=value, **where)

    # Horizon T and position weights w_t (Eq. 9), optionally shuffled among valid positions.
    horizon = p.horizon if p.horizon > 0 else (valid_cols[-1] + 1 if valid_cols else 0)
    if p.position_weight == "none":
        weight = [1.0] * length
    else:
        weight = [position_weight(c, horizon, p.w_min) for c in range(length)]
        if p.position_weight == "shuffled":
            perm = shuffle_permutation(len(valid_cols), p.shuffle_seed, r, row_offset)
            base = [weight[c] for c in valid_cols]
            for k, c in enumerate(valid_cols):
                weight[c] = base[perm[k]]

    # Token divergence D_t.
    div = [0.0] * length
    for c in valid_cols:
        i = start + c
        if p.divergence == "binary_tv":
            div[c] = binary_tv(float(lp_f[i]), float(lq_f[i]))
        elif p.divergence == "binary_kl":
            div[c] = binary_kl(float(lp_f[i]), float(lq_f[i]))
        else:
            div[c] = float(d_f[i])

    # Per-row budget (Eq. 22).
    budget = p.delta_b
    if p.adaptive_budget and valid_cols:
        q = quantile_linear(sorted(div[c] for c in valid_cols), p.budget_quantile)
        budget = min(max(p.budget_scale * q, p.delta_b), p.budget_ceiling * p.delta_b)
    row_budget[r] = budget

    # Prefix scan (Eq. 8) and the mask (Eq. 10); S and W run over every valid token.
    s_sum = 0.0  # S_{t-1}
    w_sum = 0.0  # W_{t-1}
    for c in range(length):
        i = start + c
        if p.prefix_budget:
            threshold = min(p.delta, p.delta + budget * w_sum - s_sum)
        else:
            threshold = p.delta
        out_threshold[i] = threshold
        if not valid[c]:
            continue  # reason 0, mask False, gate 0 (already zero)
        z = weight[c] * div[c]
        out_z[i] = z
        toward_mu = adv_at(c) * (float(lp_f[i]) - float(lq_f[i])) <= 0.0
        s_next = s_sum + z
        if toward_mu:
            reason, gate = KEPT_TOWARD_MU, 1.0
        else:
            reason = KEPT_WITHIN if z <= threshold else (MASKED_TOKEN if z > p.delta else MASKED_PREFIX)
            x = z / p.delta
            if p.prefix_budget:
                x = max(x, s_next / (p.delta + budget * w_sum))
            gate = 1.0 if x <= 1.0 else 1.0 / x
        out_reason[i] = reason
        out_mask[i] = reason in (KEPT_TOWARD_MU, KEPT_WITHIN)
        out_gate[i] = gate
        s_sum = s_next
        w_sum = w_sum + weight[c]


# ---------------------------------------------------------------------------------------
# Divergence references (Top-K reduced TV/KL; docs/divergences.md): the oracles of
# cppo_native.divergence.


def check_position_reference(lp, lq, y, ids, mu, pi) -> Optional[tuple]:
    """(field, slot, value) of the first rule broken at one valid position, or None."""
    if not (math.isfinite(lp) and lp <= LOG_PROB_TOLERANCE):
        return 0, 0, lp
    if not (math.isfinite(lq) and lq <= LOG_PROB_TOLERANCE):
        return 1, 0, lq
    if y < 0:
        return 2, 0, float(y)
    for k, i in enumerate(ids):
        if i < 0:
            continue
        if i in ids[:k]:
            return 3, k, float(i)
        if math.isnan(mu[k]) or mu[k] > LOG_PROB_TOLERANCE:
            return 4, k, mu[k]
        if math.isnan(pi[k]) or pi[k] > LOG_PROB_TOLERANCE:
            return 5, k, pi[k]
    return None


def rest_mass_reference(logs: list) -> float:
    """Mass outside the listed buckets, ``max(0, 1 - sum exp(l))``, evaluated as
    ``-expm1(l_max) - sum of the other exp(l)`` (first largest l) to avoid cancellation."""
    if not logs:
        return 1.0
    j = 0
    for i, v in enumerate(logs):
        if v > logs[j]:
            j = i
    rest = -math.expm1(logs[j])
    for i, v in enumerate(logs):
        if i != j:
            rest -= math.exp(v)
    return max(rest, 0.0)


def topk_position_reference(kind: str, lp: float, lq: float, y: int, ids, mu, pi) -> float:
    """Top-K reduced divergence at one position (module docstring), scalar float64."""
    buckets = []  # clamped (log mu_b, log pi_b) of the listed buckets, in order
    sampled_listed = False
    for k, i in enumerate(ids):
        if i < 0:
            continue
        if i == y:
            sampled_listed = True
        buckets.append((min(mu[k], 0.0), min(pi[k], 0.0)))
    if not sampled_listed:
        buckets.append((min(lq, 0.0), min(lp, 0.0)))
    other_mu = rest_mass_reference([a for a, _ in buckets])
    other_pi = rest_mass_reference([b for _, b in buckets])
    if kind == "tv":
        acc = 0.0
        for a, b in buckets:
            acc += abs(math.exp(a) - math.exp(b))
        return 0.5 * (acc + abs(other_mu - other_pi))
    log_eps = math.log(TOPK_EPS)
    acc = 0.0
    for a, b in buckets:
        m = math.exp(a)
        if m > 0.0:
            acc += m * (max(a, log_eps) - max(b, log_eps))
    if other_mu > 0.0:
        acc += other_mu * (math.log(max(other_mu, TOPK_EPS)) - math.log(max(other_pi, TOPK_EPS)))
    return acc if acc > 0.0 else 0.0


def topk_divergence_reference(
    log_probs, old_log_probs, topk_log_probs, topk_old_log_probs, topk_ids, sampled_ids,
    response_mask=None, *, kind: str = "tv",
) -> np.ndarray:
    """Plain-Python Top-K divergence over NumPy inputs (same arguments as
    :func:`topk_divergence`); float64 of the log-probs' shape."""
    if kind not in ("tv", "kl"):
        raise ValueError(f"kind must be 'tv' or 'kl', got {kind!r}")
    lp = np.asarray(log_probs, dtype=np.float64)
    shape = lp.shape
    k = np.asarray(topk_ids).shape[-1]
    n = lp.size
    lp = lp.reshape(n)
    lq = np.asarray(old_log_probs, dtype=np.float64).reshape(n)
    y = np.asarray(sampled_ids).reshape(n)
    ids = np.asarray(topk_ids).reshape(n, k)
    mu = np.asarray(topk_old_log_probs, dtype=np.float64).reshape(n, k)
    pi = np.asarray(topk_log_probs, dtype=np.float64).reshape(n, k)
    valid = None if response_mask is None else (np.asarray(response_mask) != 0).reshape(-1)
    out = np.zeros(lp.shape[0], dtype=np.float64)
    for n in range(lp.shape[0]):
        if valid is not None and not valid[n]:
            continue
        args = (float(lp[n]), float(lq[n]), int(y[n]), [int(i) for i in ids[n]], [float(v) for v in mu[n]],
                [float(v) for v in pi[n]])
        bad = check_position_reference(*args)
        if bad is not None:
            raise _topk_error(bad[0], shape, n, bad[1], bad[2])
        out[n] = topk_position_reference(kind, *args)
    return out.reshape(shape)

"""Diagnostic plots of CPPO masks (PNG, matplotlib's Agg canvas; no display needed).

- :class:`PositionStats` accumulates, batch by batch, per-position counts of valid and
  masked tokens and the distribution of the effective threshold c_t;
  :func:`plot_positions` draws the mask rate by reason and the threshold by position.
- :class:`Collector` feeds both from the CLI's batches and writes the two PNGs.
- :class:`RowCapture` keeps one response; :func:`plot_response` draws it as in the
  paper's Figure 3: weighted divergence bars w_t*D_t coloured by outcome, the token
  threshold delta, the prefix-adjusted threshold c_t, and the prefix-average divergence
  S_t/W_t against the budget delta_b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .reference import binary_kl, position_weight, shuffle_permutation

try:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
    raise ImportError(
        "plots need matplotlib; install it with `pip install matplotlib` (or, from a cppo-native checkout, `pip install '.[cli]'`)"
    ) from exc

# One colour per reason code (0 invalid .. 4 masked by the prefix budget).
REASON_COLORS = ("#d9d9d9", "#9ecae1", "#2b6cb0", "#d62728", "#f28e2b")
REASON_LABELS = (
    "invalid",
    "kept: toward mu",
    "kept: within c_t",
    "masked: token threshold (Z > delta)",
    "masked: prefix budget (Z > c_t)",
)
THRESHOLD_COLOR = "#6a3d9a"

# Histogram of c_t per position bucket: bins of delta/10 over [delta - _SPAN * delta, delta]
# (lower values are counted in the lowest bin).
_HIST_BINS = 400
_SPAN = 40.0
_BUCKET = 8  # positions per histogram bucket


def _style(ax) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(True, axis="y", color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)


def _grow(a: np.ndarray, n: int) -> np.ndarray:
    if a.shape[0] >= n:
        return a
    out = np.zeros((max(n, 2 * a.shape[0]),) + a.shape[1:], dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


@dataclass
class PositionStats:
    """Streaming per-position statistics over all responses."""

    delta: float
    valid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    masked_token: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    masked_prefix: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    threshold_sum: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    hist: np.ndarray = field(default_factory=lambda: np.zeros((0, _HIST_BINS), np.int64))
    length: int = 0

    def update(self, offsets: np.ndarray, reason: np.ndarray, threshold: np.ndarray) -> None:
        """Add one batch: packed ``reason``/``threshold`` with row ``offsets``."""
        n = reason.shape[0]
        if n == 0:
            return
        lengths = np.diff(offsets)
        pos = np.arange(n, dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        v = reason != 0
        pos_v, thr_v, r_v = pos[v], threshold[v], reason[v]
        length = int(pos.max()) + 1 if n else 0
        self.length = max(self.length, length)
        for name in ("valid", "masked_token", "masked_prefix", "threshold_sum"):
            setattr(self, name, _grow(getattr(self, name), self.length))
        m = self.length
        self.valid[:m] += np.bincount(pos_v, minlength=m)[:m]
        self.masked_token[:m] += np.bincount(pos_v[r_v == 3], minlength=m)[:m]
        self.masked_prefix[:m] += np.bincount(pos_v[r_v == 4], minlength=m)[:m]
        self.threshold_sum[:m] += np.bincount(pos_v, weights=thr_v, minlength=m)[:m]
        buckets = (m + _BUCKET - 1) // _BUCKET
        self.hist = _grow(self.hist, buckets)
        lo = self.delta * (1.0 - _SPAN)
        vb = np.clip(((thr_v - lo) / (self.delta - lo) * _HIST_BINS).astype(np.int64), 0, _HIST_BINS - 1)
        flat = (pos_v // _BUCKET) * _HIST_BINS + vb
        self.hist[:buckets] += np.bincount(flat, minlength=buckets * _HIST_BINS)[: buckets * _HIST_BINS].reshape(
            buckets, _HIST_BINS
        )

    def _quantile(self, q: float, rows: np.ndarray) -> np.ndarray:
        """Quantile of c_t from the bucket histograms (bin centres; NaN where empty)."""
        lo = self.delta * (1.0 - _SPAN)
        centres = lo + (np.arange(_HIST_BINS) + 0.5) * (self.delta - lo) / _HIST_BINS
        cum = np.cumsum(rows, axis=1)
        total = cum[:, -1:]
        idx = (cum >= np.maximum(q * total, 1e-12)).argmax(axis=1)
        out = centres[idx]
        out[total[:, 0] == 0] = np.nan
        return out


def plot_positions(stats: PositionStats, path: str, *, title: str = "") -> None:
    """Mask rate by reason and the effective threshold c_t, by position in the response."""
    m = stats.length
    fig = Figure(figsize=(11, 7.2), dpi=110, layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[1.0, 1.1])
    if m == 0 or not stats.valid[:m].any():
        for ax in (ax1, ax2):
            ax.text(0.5, 0.5, "no valid tokens", ha="center", va="center", transform=ax.transAxes)
        fig.savefig(path)
        return
    # Bin positions so that the curves stay readable for long responses.
    width = max(1, math.ceil(m / 300))
    nb = (m + width - 1) // width
    pad = nb * width - m

    def binned(a: np.ndarray) -> np.ndarray:
        return np.pad(a[:m].astype(np.float64), (0, pad)).reshape(nb, width).sum(axis=1)

    valid = binned(stats.valid)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate_tok = binned(stats.masked_token) / valid
        rate_pre = binned(stats.masked_prefix) / valid
        mean_thr = binned(stats.threshold_sum) / valid
    x = (np.arange(nb) * width + (width + 1) / 2.0)  # 1-based position at the bin centre
    keep = valid > 0
    x, rate_tok, rate_pre, mean_thr, valid = x[keep], rate_tok[keep], rate_pre[keep], mean_thr[keep], valid[keep]

    ax1.fill_between(x, 0, 100 * rate_pre, step="mid", color=REASON_COLORS[4], alpha=0.85, linewidth=0,
                     label=REASON_LABELS[4])
    ax1.fill_between(x, 100 * rate_pre, 100 * (rate_pre + rate_tok), step="mid", color=REASON_COLORS[3],
                     alpha=0.9, linewidth=0, label=REASON_LABELS[3])
    ax1.step(x, 100 * (rate_pre + rate_tok), where="mid", color="#333333", linewidth=0.9, label="masked, total")
    ax1.set_ylabel("masked share of valid tokens (%)")
    ax1.set_ylim(0, max(5.0, min(100.0, 100 * float(np.nanmax(rate_pre + rate_tok)) * 1.15)))
    _style(ax1)
    twin = ax1.twinx()
    twin.plot(x, valid / width, color="#7f7f7f", linewidth=1.0, linestyle=":", label="responses reaching t")
    twin.set_ylabel("responses reaching position t", color="#7f7f7f")
    twin.tick_params(axis="y", colors="#7f7f7f")
    twin.set_ylim(0, float(valid.max() / width) * 1.05)
    twin.spines["top"].set_visible(False)
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper left", frameon=True, framealpha=0.9, edgecolor="none", fontsize=9,
               ncol=2)
    ax1.set_title("Where CPPO masks: share of valid tokens masked at each position", loc="left", fontsize=11)

    # Threshold: mean, median and 10-90% range (from per-bucket histograms).
    buckets = stats.hist[: (m + 7) // 8]
    group = max(1, math.ceil(width / 8))
    nb2 = (buckets.shape[0] + group - 1) // group
    hist = np.pad(buckets, ((0, nb2 * group - buckets.shape[0]), (0, 0))).reshape(nb2, group, -1).sum(axis=1)
    xq = np.arange(nb2) * group * 8 + (group * 8 + 1) / 2.0
    q10, q50, q90 = (stats._quantile(q, hist) for q in (0.1, 0.5, 0.9))
    ok = ~np.isnan(q50)
    ax2.fill_between(xq[ok], q10[ok], q90[ok], step="mid", color=THRESHOLD_COLOR, alpha=0.16, linewidth=0,
                     label="c_t, 10-90% of tokens")
    ax2.step(xq[ok], q50[ok], where="mid", color=THRESHOLD_COLOR, linewidth=1.1, linestyle=(0, (2, 1.5)),
             alpha=0.9, label="c_t, median")
    ax2.plot(x, mean_thr, color=THRESHOLD_COLOR, linewidth=1.8, label="c_t, mean")
    ax2.axhline(stats.delta, color="black", linestyle=(0, (5, 3)), linewidth=1.1, label=f"delta = {stats.delta:g}")
    ax2.axhline(0.0, color="#999999", linewidth=0.8)
    lo_lim = min(float(np.nanmin(mean_thr)), float(np.nanmin(q10[ok])) if ok.any() else 0.0, -0.1 * stats.delta)
    # Linear within [-delta, delta], logarithmic below: the bulk of tokens sits near
    # delta while a few drifted responses drive c_t far below zero.
    ax2.set_yscale("symlog", linthresh=stats.delta, linscale=2.0)
    bottom = min(lo_lim * 1.3, -stats.delta)
    ax2.set_ylim(bottom, stats.delta * 1.6)
    ticks = [stats.delta, stats.delta / 2, 0.0, -stats.delta / 2, -stats.delta]
    mag = 1.0
    while -mag > bottom:
        if mag > stats.delta * 1.5:
            ticks.append(-mag)
        mag *= 10.0
    ax2.set_yticks(ticks, [f"{v:g}" for v in ticks])
    ax2.minorticks_off()
    ax2.set_ylabel("effective threshold c_t\n(log scale below -delta)")
    ax2.set_xlabel("position t in the response (token)")
    ax2.set_xlim(0.5, m + 0.5)
    _style(ax2)
    ax2.legend(loc="lower left", frameon=True, framealpha=0.9, edgecolor="none", fontsize=9, ncol=2)
    ax2.set_title("Prefix-adjusted threshold c_t at valid tokens (lower = less room left)", loc="left",
                  fontsize=11)
    if title:
        fig.suptitle(title, fontsize=12, x=0.01, ha="left")
    fig.savefig(path)


# ---------------------------------------------------------------------------------------
# One response, as in the paper's Figure 3.


@dataclass
class RowCapture:
    """The inputs and outputs of one response (copies of its slices)."""

    row: int  # row index in the table
    row_in_batch: int  # row index in the batch handed to the backend
    log_probs: np.ndarray
    old_log_probs: np.ndarray
    advantages: np.ndarray  # per token
    valid: np.ndarray  # bool
    divergence: Optional[np.ndarray]
    reason: np.ndarray
    threshold: np.ndarray
    row_budget: float


def row_terms(cap: RowCapture, knobs: dict) -> tuple:
    """Position weights w_t, divergences D_t and Z_t = v_t w_t D_t of a captured row,
    following the spec (the backend does not return them)."""
    n = cap.reason.shape[0]
    valid_cols = np.flatnonzero(cap.valid)
    horizon = knobs.get("horizon", "sequence")
    w_min = float(knobs.get("w_min", 0.8))
    pw = knobs.get("position_weight", True)
    if isinstance(horizon, str):
        T = int(valid_cols[-1]) + 1 if valid_cols.size else 0
    else:
        T = int(horizon)
    if pw is False or pw == "none":
        w = np.ones(n)
    else:
        w = np.array([position_weight(c, T, w_min) for c in range(n)])
        if pw == "shuffled":
            perm = shuffle_permutation(len(valid_cols), int(knobs.get("shuffle_seed", 0)), cap.row)
            base = w[valid_cols].copy()
            w[valid_cols] = base[perm]
    lp = cap.log_probs.astype(np.float64)
    lq = cap.old_log_probs.astype(np.float64)
    if cap.divergence is not None:
        d = cap.divergence.astype(np.float64)
    elif knobs.get("divergence") == "binary_kl":
        d = np.array([binary_kl(a, b) if v else 0.0 for a, b, v in zip(lp, lq, cap.valid)])
    else:
        d = np.abs(np.exp(lp) - np.exp(lq))
    d = np.where(cap.valid, d, 0.0)
    z = np.where(cap.valid, w * d, 0.0)
    return w, d, z


def plot_response(cap: RowCapture, knobs: dict, path: str) -> None:
    """Figure-3-style drawing of one response."""
    delta = float(knobs["delta"])
    prefix_budget = bool(knobs.get("prefix_budget", True))
    w, d, z = row_terms(cap, knobs)
    n = z.shape[0]
    t = np.arange(1, n + 1)
    r = cap.reason
    counts = np.bincount(r, minlength=5)

    fig = Figure(figsize=(12, 6.4), dpi=110, layout="constrained")
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[2.6, 1.0])
    bar_w = 1.0 if n > 60 else 0.8
    for code in (1, 2, 3, 4):
        sel = r == code
        if sel.any():
            ax.bar(t[sel], z[sel], width=bar_w, color=REASON_COLORS[code], linewidth=0,
                   label=f"{REASON_LABELS[code]}: {int(counts[code])}")
    inv = r == 0
    if inv.any():
        ax.bar(t[inv], np.full(int(inv.sum()), delta * 0.04), width=bar_w, color=REASON_COLORS[0], linewidth=0,
               label=f"invalid (not a generated token): {int(counts[0])}")
    ax.axhline(delta, color="black", linestyle=(0, (5, 3)), linewidth=1.2, label=f"delta = {delta:g}")
    ax.step(t, cap.threshold, where="mid", color=THRESHOLD_COLOR, linewidth=1.8,
            label="c_t, prefix-adjusted threshold" if prefix_budget else "c_t = delta (no prefix budget)")
    ax.axhline(0.0, color="#999999", linewidth=0.8)
    top = max(float(z.max()) if n else 0.0, delta) * 1.15
    # Once c_t is below zero every token that moves away from mu is masked; how far below
    # does not matter, so the axis stops at -delta/2 and says where c_t ends up.
    floor = -0.5 * delta
    low = float(np.min(cap.threshold)) if n else 0.0
    ax.set_ylim(max(low, floor) - 0.06 * top if low < 0 else -0.04 * top, top)
    if low < floor:
        ax.annotate(f"c_t continues down to {low:.3g}", xy=(0.995, 0.02), xycoords="axes fraction",
                    ha="right", va="bottom", fontsize=8.5, color=THRESHOLD_COLOR)
    ax.set_ylabel("weighted divergence  Z_t = w_t D_t")
    _style(ax)
    adv = cap.advantages[cap.valid]
    if adv.size == 0:
        adv_txt = "no advantage used"
    elif np.all(adv == adv[0]):
        adv_txt = f"A = {adv[0]:+.3g}"
    else:
        adv_txt = "per-token A"
    masked = int(counts[3] + counts[4])
    ax.set_title(
        f"Response {cap.row}: {int(cap.valid.sum())} valid tokens, {adv_txt}, "
        f"{masked} masked ({int(counts[3])} by the token threshold, {int(counts[4])} by the prefix budget)",
        loc="left", fontsize=11,
    )
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=4, frameon=False, fontsize=9)

    # Prefix-average divergence S_t / W_t against the row budget delta_b_row.
    vw = np.where(cap.valid, w, 0.0)
    s = np.cumsum(z)
    wsum = np.cumsum(vw)
    with np.errstate(invalid="ignore", divide="ignore"):
        avg = np.where(wsum > 0, s / wsum, np.nan)
    ax2.plot(t, avg, color="#2f4b7c", linewidth=1.5, label="prefix average S_t / W_t")
    ax2.axhline(cap.row_budget, color="#2f4b7c", linestyle=(0, (5, 3)), linewidth=1.1,
                label=f"budget delta_b = {cap.row_budget:.3g}")
    ax2.fill_between(t, 0, 1, where=(r == 4) | (r == 3), step="mid", transform=ax2.get_xaxis_transform(),
                     color=REASON_COLORS[4], alpha=0.12, linewidth=0, label="masked positions")
    ax2.set_ylabel("prefix average")
    ax2.set_xlabel("position t in the response (token)")
    ax2.set_xlim(0.5, max(n, 1) + 0.5)
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    finite = avg[np.isfinite(avg)]
    ymax = max(float(finite.max()) if finite.size else 0.0, cap.row_budget) * 1.2
    ax2.set_ylim(0, ymax if ymax > 0 else 1.0)
    _style(ax2)
    ax2.legend(loc="upper right", frameon=True, framealpha=0.9, edgecolor="none", fontsize=8.5, ncol=3)
    fig.savefig(path)


def pick_score(n_reason: np.ndarray, lengths: np.ndarray, min_threshold: np.ndarray, delta: float) -> np.ndarray:
    """How well each row illustrates CPPO (higher is better): tokens masked by the prefix
    budget and tokens kept within c_t, a threshold that stays in view (c_t >= -delta/2),
    a token-threshold mask, then a readable length (about 60-200 tokens)."""
    has = n_reason[:, 1:5] > 0
    in_view = np.clip(1.0 + 2.0 * min_threshold / delta, 0.0, 1.0)
    readable = np.clip(1.0 - np.abs(lengths - 120.0) / 400.0, 0.0, 1.0)
    n = n_reason.astype(np.float64)
    score = (3.0 * np.minimum(n[:, 4] / 8.0, 1.0) + 2.0 * np.minimum(n[:, 2] / 8.0, 1.0) + 3.0 * in_view
             + 1.0 * has[:, 2] + readable)
    return np.where(lengths > 0, score, -1.0)  # an empty response is drawn only if all are


def capture_row(
    row: int, row_in_batch: int, offsets: np.ndarray, log_probs: np.ndarray, old_log_probs: np.ndarray,
    advantages: np.ndarray, per_row_advantage: bool, valid: Optional[np.ndarray], divergence: Optional[np.ndarray],
    reason: np.ndarray, threshold: np.ndarray, row_budget: Any,
) -> RowCapture:
    a, b = int(offsets[row_in_batch]), int(offsets[row_in_batch + 1])
    n = b - a
    adv = (np.full(n, float(advantages[row_in_batch])) if per_row_advantage
           else np.asarray(advantages[a:b], dtype=np.float64).copy())
    return RowCapture(
        row=row,
        row_in_batch=row_in_batch,
        log_probs=np.array(log_probs[a:b], dtype=np.float64),
        old_log_probs=np.array(old_log_probs[a:b], dtype=np.float64),
        advantages=adv,
        valid=np.ones(n, bool) if valid is None else np.asarray(valid[a:b]) != 0,
        divergence=None if divergence is None else np.array(divergence[a:b], dtype=np.float64),
        reason=np.array(reason[a:b]),
        threshold=np.array(threshold[a:b]),
        row_budget=float(row_budget),
    )


# ---------------------------------------------------------------------------------------
# The CLI's plots (``cppo-mask --plot DIR``).


class Collector:
    """Accumulates :class:`PositionStats` and picks the drawn response from the CLI's
    batches (``update(result, row_offset)`` per :class:`cppo_native.arrow.ArrowMaskResult`),
    then writes ``positions.png`` and ``response.png`` into ``directory`` (``finish``).
    ``row``: the response to draw, or None for the best :func:`pick_score`."""

    def __init__(self, directory: str, knobs: dict, row: Optional[int] = None) -> None:
        self.directory = directory
        self.knobs = knobs
        self.row = row
        self.delta = float(knobs["delta"])
        self.stats = PositionStats(delta=self.delta)
        self.capture: Optional[RowCapture] = None
        self.best = -1.0

    def update(self, res: Any, row_offset: int) -> None:
        off = res.offsets
        self.stats.update(off, res.reason_values, res.threshold_values)
        n_rows = off.shape[0] - 1
        if n_rows == 0:
            return
        if self.row is not None:
            local = self.row - row_offset
            if not 0 <= local < n_rows:
                return
        else:
            r = res.reason_values
            counts = np.empty((n_rows, 5), np.int64)
            for code in range(5):
                cs = np.concatenate(([0], np.cumsum(r == code, dtype=np.int64)))
                counts[:, code] = cs[off[1:]] - cs[off[:-1]]
            lengths = np.diff(off)
            min_thr = np.zeros(n_rows)
            nonempty = lengths > 0
            if nonempty.any():
                min_thr[nonempty] = np.minimum.reduceat(res.threshold_values, off[:-1][nonempty])
            score = pick_score(counts, lengths.astype(np.float64), min_thr, self.delta)
            local = int(np.argmax(score))
            if score[local] <= self.best:
                return
            self.best = float(score[local])
        inp = res.inputs
        self.capture = capture_row(
            row_offset + local, local, off, inp["log_probs"], inp["old_log_probs"], inp["advantages"],
            inp["advantage_per_row"], inp["valid"], inp["divergence"], res.reason_values, res.threshold_values,
            res.row_budget_values[local],
        )

    def title(self, d: dict) -> str:
        k = self.knobs
        delta_b = float(k["delta_b"])
        if k.get("adaptive_budget"):
            m = float(k.get("budget_ceiling", 2.0))
            mean = d.get("mean_row_budget")
            budget = f"adaptive delta_b_row in [{delta_b:g}, {m * delta_b:g}]"
            if mean is not None:
                budget += f", mean {mean:.3g}"
        else:
            budget = f"delta_b={delta_b:g}"
        return (f"CPPO masks over {d['rows']:,} responses, {d['valid_tokens']:,} valid tokens "
                f"(delta={self.delta:g}, {budget}, w_min={float(k.get('w_min', 0.8)):g}): "
                f"{100 * d['masked_share']:.1f}% masked")

    def finish(self, summary: Any) -> None:
        """Writes the PNGs; ``summary``: the CLI's summary (``as_dict``, ``rows``).
        Raises ValueError if the requested row was never seen."""
        import os

        os.makedirs(self.directory, exist_ok=True)
        plot_positions(self.stats, os.path.join(self.directory, "positions.png"), title=self.title(summary.as_dict(1.0)))
        if self.capture is None:
            if self.row is not None:
                raise ValueError(f"--plot-row {self.row} is out of range (the input has {summary.rows} rows)")
            return
        plot_response(self.capture, self.knobs, os.path.join(self.directory, "response.png"))

"""``cppo-mask``'s per-reason summary: counts accumulated batch by batch, printed as a
table and written as JSON (``--summary-json``)."""

from __future__ import annotations

import numpy as np


class Summary:
    """Counts per reason code and per row, accumulated batch by batch."""

    def __init__(self, knobs: dict):
        self.counts = np.zeros(5, np.int64)
        self.rows = 0
        self.tokens = 0
        self.rows_masked = 0
        self.rows_with_valid = 0
        self.budget_sum = 0.0
        self.budget_rows = 0
        self.knobs = knobs

    def update(self, res) -> None:
        self.counts += res.reason_counts
        off = res.offsets
        self.rows += off.shape[0] - 1
        self.tokens += int(off[-1])
        r = res.reason_values
        nonempty = off[1:] > off[:-1]
        if not nonempty.any():
            return
        starts = off[:-1][nonempty]
        # Per row, from the largest code (one reduceat over non-empty rows): any masked
        # token (3 or 4), any valid token (not 0).
        top = np.maximum.reduceat(r, starts)
        any_masked = top >= 3
        any_valid = top != 0
        self.rows_masked += int(any_masked.sum())
        self.rows_with_valid += int(any_valid.sum())
        self.budget_sum += float(res.row_budget_values[nonempty][any_valid].sum())
        self.budget_rows += int(any_valid.sum())

    def as_dict(self, seconds: float) -> dict:
        from .._core.codes import REASON_NAMES

        valid = int(self.counts[1:].sum())
        share = {name: (float(self.counts[i]) / valid if valid else 0.0)
                 for i, name in enumerate(REASON_NAMES) if i}
        return {
            "rows": self.rows,
            "tokens": self.tokens,
            "valid_tokens": valid,
            "reason_counts": {name: int(self.counts[i]) for i, name in enumerate(REASON_NAMES)},
            "share_of_valid": share,
            "kept_share": share["kept_toward_mu"] + share["kept_within_threshold"],
            "masked_share": share["masked_token_threshold"] + share["masked_prefix_budget"],
            "rows_with_masked_token": self.rows_masked,
            "mean_row_budget": self.budget_sum / self.budget_rows if self.budget_rows else None,
            "seconds": seconds,
            "tokens_per_second": self.tokens / seconds if seconds > 0 else None,
            "knobs": {k: v for k, v in self.knobs.items() if k != "num_threads"},
        }

    def table(self, seconds: float) -> str:
        d = self.as_dict(seconds)
        valid = d["valid_tokens"]
        labels = [
            ("1", "kept: moves toward mu", "kept_toward_mu"),
            ("2", "kept: within threshold c_t", "kept_within_threshold"),
            ("3", "masked: token threshold (Z_t > delta)", "masked_token_threshold"),
            ("4", "masked: prefix budget (Z_t > c_t)", "masked_prefix_budget"),
        ]
        w = max(12, len(f"{self.tokens:,}"))
        lines = [
            f"cppo-mask: {d['rows']:,} responses, {d['tokens']:,} tokens ({valid:,} valid) in {seconds:.2f} s",
            "",
            f"  {'code':<5}{'outcome':<40}{'tokens':>{w}}  {'of valid':>8}",
            f"  {'-' * 5}{'-' * 40}{'-' * w}  {'-' * 8}",
        ]
        for code, label, key in labels:
            lines.append(f"  {code:<5}{label:<40}{d['reason_counts'][key]:>{w},}  {100 * d['share_of_valid'][key]:>7.2f}%")
        lines.append(f"  {'-' * 5}{'-' * 40}{'-' * w}  {'-' * 8}")
        kept = d["reason_counts"]["kept_toward_mu"] + d["reason_counts"]["kept_within_threshold"]
        masked = d["reason_counts"]["masked_token_threshold"] + d["reason_counts"]["masked_prefix_budget"]
        lines.append(f"  {'1+2':<5}{'kept':<40}{kept:>{w},}  {100 * d['kept_share']:>7.2f}%")
        lines.append(f"  {'3+4':<5}{'masked':<40}{masked:>{w},}  {100 * d['masked_share']:>7.2f}%")
        lines.append(f"  {'0':<5}{'invalid (padding/prompt; not counted)':<40}{d['reason_counts']['invalid']:>{w},}")
        lines.append("")
        frac = d["rows_with_masked_token"] / d["rows"] if d["rows"] else 0.0
        lines.append(f"  responses with a masked token: {d['rows_with_masked_token']:,} ({100 * frac:.1f}%)")
        if d["mean_row_budget"] is not None and self.knobs.get("adaptive_budget"):
            lines.append(f"  mean adaptive row budget delta_b_row: {d['mean_row_budget']:.4g}")
        return "\n".join(lines)

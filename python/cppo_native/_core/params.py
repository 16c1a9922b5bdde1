"""The knob table: every CPPO hyper-parameter, written once.

``KNOBS`` lists each knob with its public default, its check and a one-line doc
(semantics: ``docs/semantics.md``). Everything else is derived from it or checked
against it by ``tests/test_knobs.py``: the keyword arguments of ``cppo_mask``, the
reference and ``cppo_policy_loss``, the CLI flags, the Arrow/Ray option lists, the verl
and TRL config keys. ``make_params`` runs the checks and returns a frozen
:class:`MaskParams`, the normalised form every backend reads (Rust reads its attributes
by name through ``FromPyObject``; the CUDA argument block is filled from it).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .codes import DIVERGENCE_MODES, POSITION_WEIGHT_MODES

# Floor on the "rest" probability mass (1 - p) in Binary KL, so that a token whose
# log-prob rounds to exactly 0.0 in fp32/bf16 does not give an infinite divergence.
BINARY_KL_EPS = 1e-12


class _Required:
    """The default of a knob the caller must give (``delta``, ``delta_b``)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


# ---------------------------------------------------------------------------------------
# Checks: each takes (name, value) and returns the normalised value or raises.


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _real_check(test: Callable[[float], bool], rule: str) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        v = _real(name, value)
        if not test(v):
            raise ValueError(f"{name} must be {rule}, got {value!r}")
        return v

    check.rule = rule  # type: ignore[attr-defined]
    return check


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, numbers.Integral)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


_flag.rule = "True or False"  # type: ignore[attr-defined]


def _horizon(name: str, value: Any) -> int:
    """"sequence" -> 0; an int T >= 1 -> T."""
    if isinstance(value, str):
        if value != "sequence":
            raise ValueError(f'{name} must be "sequence" or an int >= 1, got {value!r}')
        return 0
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if int(value) < 1:
            raise ValueError(f'{name} must be "sequence" or an int >= 1, got {value!r}')
        if int(value) >= 2**63:
            raise ValueError(f"{name} must be below 2**63, got {value!r}")
        return int(value)
    raise TypeError(f'{name} must be "sequence" or an int >= 1, got {value!r}')


_horizon.rule = '"sequence" or an int >= 1'  # type: ignore[attr-defined]


def _position_weight(name: str, value: Any) -> str:
    if value is True:
        return "linear"
    if value is False:
        return "none"
    if isinstance(value, str) and value in POSITION_WEIGHT_MODES:
        return value
    raise ValueError(f'{name} must be True, False, "linear", "none" or "shuffled", got {value!r}')


_position_weight.rule = 'True, False, "linear", "none" or "shuffled"'  # type: ignore[attr-defined]


def _seed(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= int(value) < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value!r}")
    return int(value)


_seed.rule = "an int in [0, 2**64)"  # type: ignore[attr-defined]


def divergence_array(value: Any) -> Any:
    """The caller's D when ``divergence`` is an array (mode "given"), else None (a name
    or None selects an estimator)."""
    return None if value is None or isinstance(value, str) else value


def _divergence(name: str, value: Any) -> str:
    """The estimator's name, or "given" for an array (checked where arrays are)."""
    if divergence_array(value) is not None:
        return "given"
    if value is None:
        return "binary_tv"
    if value in DIVERGENCE_MODES and value != "given":
        return value
    raise ValueError(f'{name} must be None, "binary_tv", "binary_kl" or an array, got {value!r}')


_divergence.rule = 'None, "binary_tv", "binary_kl" or an array of the log-probs\' shape'  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------
# The table.


@dataclass(frozen=True)
class Knob:
    """One CPPO hyper-parameter: its name, public default, check and one-line doc.

    ``paper`` is the paper's value where the default is ``REQUIRED`` (the CLI and the
    trainer configs, which need a value, use it); ``kind`` tells faces that parse text
    (the CLI, trainer configs) what the value is.
    """

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    doc: str
    kind: str  # "float" | "bool" | "int" | "horizon" | "position_weight" | "divergence"
    paper: Any = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def rule(self) -> str:
        return getattr(self.check, "rule", "")

    @property
    def flag(self) -> str:
        """The CLI flag (``--budget-ceiling``)."""
        return "--" + self.name.replace("_", "-")


KNOBS: tuple = (
    Knob("delta", REQUIRED, _real_check(lambda v: v > 0, "> 0"),
         "token threshold scale delta (paper: 0.15 dense, 0.20 MoE)", "float", paper=0.15),
    Knob("delta_b", REQUIRED, _real_check(lambda v: v >= 0, ">= 0"),
         "prefix-average budget delta_b (paper: 0.015-0.02)", "float", paper=0.02),
    Knob("w_min", 0.8, _real_check(lambda v: 0 < v <= 1, "in (0, 1]"),
         "position-weight floor w_min of Eq. 9", "float"),
    Knob("horizon", "sequence", _horizon,
         'T of the position weight: "sequence" (1 + last valid index of the row) or a fixed int', "horizon"),
    Knob("adaptive_budget", False, _flag,
         "per-row budget clamp(k * Q_q(D), delta_b, m * delta_b) (Eq. 22) instead of delta_b", "bool"),
    Knob("budget_quantile", 0.9, _real_check(lambda v: 0 <= v <= 1, "in [0, 1]"),
         "q of the adaptive budget's quantile", "float"),
    Knob("budget_scale", 1.0, _real_check(lambda v: v >= 0, ">= 0"),
         "k of the adaptive budget", "float"),
    Knob("budget_ceiling", 2.0, _real_check(lambda v: v >= 1, ">= 1"),
         "m of the adaptive budget: at most m * delta_b (2: paper and UniRL; 5: verl PR #6731)", "float"),
    Knob("position_weight", True, _position_weight,
         'True (Eq. 9), False (w = 1) or "shuffled" (ablation: weights permuted within a row)',
         "position_weight"),
    Knob("shuffle_seed", 0, _seed, 'seed of the "shuffled" ablation', "int"),
    Knob("prefix_budget", True, _flag, "False gives c_t = delta (position weight only)", "bool"),
    Knob("divergence", None, _divergence,
         'D_t: None or "binary_tv" (default), "binary_kl", or an array of the log-probs\' shape',
         "divergence"),
)

KNOB_NAMES: tuple = tuple(k.name for k in KNOBS)
_BY_NAME = {k.name: k for k in KNOBS}


def knob(name: str) -> Knob:
    return _BY_NAME[name]


def defaults(*, paper: bool = False) -> dict:
    """Public defaults by name; with ``paper``, the paper's values for required knobs."""
    return {k.name: (k.paper if (paper and k.required) else k.default) for k in KNOBS}


@dataclass(frozen=True)
class MaskParams:
    """Checked, normalised knobs: what every backend reads (one field per knob)."""

    delta: float
    delta_b: float
    w_min: float = 0.8
    horizon: int = 0  # 0 means horizon="sequence"; otherwise the fixed T >= 1
    adaptive_budget: bool = False
    budget_quantile: float = 0.9
    budget_scale: float = 1.0
    budget_ceiling: float = 2.0
    position_weight: str = "linear"  # "linear" | "none" | "shuffled"
    shuffle_seed: int = 0
    prefix_budget: bool = True
    divergence: str = "binary_tv"  # "binary_tv" | "binary_kl" | "given"

    @property
    def position_weight_code(self) -> int:
        return POSITION_WEIGHT_MODES[self.position_weight]

    @property
    def divergence_code(self) -> int:
        return DIVERGENCE_MODES[self.divergence]


def make_params(**values: Any) -> MaskParams:
    """Check every knob (missing ones take their defaults) and return ``MaskParams``.

    ``divergence`` may be an estimator's name, None, or the caller's array D (mode
    "given"; the array itself is checked with the other arrays).
    """
    key = _cache_key(values)
    if key is not None:
        hit = _PARAMS_CACHE.get(key)
        if hit is not None:
            return hit
    unknown = [name for name in values if name not in _BY_NAME]
    if unknown:
        raise TypeError(f"unknown CPPO option(s): {', '.join(unknown)}; expected some of {', '.join(KNOB_NAMES)}")
    out = {}
    for k in KNOBS:
        value = values.get(k.name, k.default)
        if value is REQUIRED:
            raise TypeError(f"{k.name} is required ({k.doc})")
        out[k.name] = k.check(k.name, value)
    params = MaskParams(**out)
    if key is not None:
        if len(_PARAMS_CACHE) >= _PARAMS_CACHE_SIZE:
            _PARAMS_CACHE.clear()
        _PARAMS_CACHE[key] = params
    return params


# make_params on knobs it has already checked: a training loop calls the mask with the
# same knobs every step, and checking them is a third of a small call's Python time.
# Only plain values are keys (an array or tensor given as divergence is not: it would be
# kept alive); floats by their hex form, so that -0.0 and 0.0 stay apart.
_PARAMS_CACHE: dict = {}
_PARAMS_CACHE_SIZE = 64
_PLAIN = (bool, int, float, str, type(None))


def _cache_key(values: dict) -> Optional[tuple]:
    key = []
    for name, value in values.items():
        t = type(value)
        if t not in _PLAIN:
            return None
        key.append((name, t, value.hex() if t is float else value))
    return tuple(key)


def max_threads() -> int:
    """The most threads a call may ask for: max(64, 4 x the machine's cores). Far more
    threads than cores only costs (a request for 100,000 threads kept a 2-core machine
    busy for minutes); the floor of 64 keeps configurations portable between machines."""
    return max(64, 4 * _cpu_count())


_CPU_COUNT: list = []


def _cpu_count() -> int:
    """``os.cpu_count()``, read once (it was ~3 us of every call)."""
    if not _CPU_COUNT:
        import os

        _CPU_COUNT.append(os.cpu_count() or 1)
    return _CPU_COUNT[0]


def check_num_threads(num_threads: Optional[int]) -> Optional[int]:
    """``num_threads``: None (all cores) or an int in [1, :func:`max_threads`]."""
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral) or num_threads < 1
    ):
        raise ValueError(f"num_threads must be None or an int >= 1, got {num_threads!r}")
    if num_threads is not None and num_threads > max_threads():
        raise ValueError(
            f"num_threads={num_threads} is far above this machine's {_cpu_count()} cores; at most "
            f"{max_threads()} (max(64, 4 x cores)) are allowed; None uses every core"
        )
    return None if num_threads is None else int(num_threads)

"""cppo-native: the CPPO trust-region mask, fast, for LLM reinforcement learning.

CPPO here is Cumulative Prefix-divergence Policy Optimization (arXiv 2606.10968), not
CVaR-constrained PPO nor Completion Pruning Policy Optimization. The semantics are
stated in ``docs/semantics.md``; :mod:`cppo_native.reference` mirrors them line by line.
"""

from ._core.version import __version__
from .mask import REASON_NAMES, MaskInfo, cppo_mask
from .reference import cppo_mask_reference

__all__ = ["cppo_mask", "cppo_mask_reference", "MaskInfo", "REASON_NAMES", "__version__"]

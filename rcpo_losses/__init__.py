"""rcpo-losses: RCPO loss kernels for aligning LLMs with ranked preference feedback.

Rewards (eq. 2 and variants) feed choice models (MNL, Mallows-RMJ), which feed
reductions over prompts. See docs/index.md.
"""

# ruff: noqa: E402
# The installed torch is checked before any module imports it: an older one raises ImportError naming both versions.
from . import versions

versions.require("torch")

from .dispersion import entropy_dispersion
from .mallows import (
    mallows_rmj_discrete,
    mallows_rmj_log_likelihood,
    mallows_rmj_pairwise,
    mallows_rmj_topk,
    mallows_rmj_topk_from_rewards,
)
from .metrics import ranking_metrics
from .mnl import mnl_discrete, mnl_log_likelihood, mnl_pairwise, mnl_topk, mnl_topk_from_rewards
from .ranks import IGNORE, UNRANKED, all_pairs, ranks_from_order, ranks_from_scores, top_bottom_pair
from .rewards import implicit_rewards
from .tokens.fused_linear import fused_linear_response_stats, fused_linear_token_stats
from .tokens.lm_head import LMHeadSpec, check_lm_head_spec, final_hidden_states, lm_head_spec
from .tokens.stats import (
    ResponseTokenStats,
    entropy_dispersion_from_logits,
    response_token_stats,
    sequence_logps,
    token_logps_and_entropy,
)
from .training.model_stats import response_stats
from .training.precompute import precompute_reference_stats

__version__ = "0.1.0"

__all__ = [
    "IGNORE",
    "LMHeadSpec",
    "UNRANKED",
    "ResponseTokenStats",
    "all_pairs",
    "check_lm_head_spec",
    "entropy_dispersion",
    "entropy_dispersion_from_logits",
    "final_hidden_states",
    "fused_linear_response_stats",
    "fused_linear_token_stats",
    "implicit_rewards",
    "lm_head_spec",
    "mallows_rmj_discrete",
    "mallows_rmj_log_likelihood",
    "mallows_rmj_pairwise",
    "mallows_rmj_topk",
    "mallows_rmj_topk_from_rewards",
    "mnl_discrete",
    "mnl_log_likelihood",
    "mnl_pairwise",
    "mnl_topk",
    "mnl_topk_from_rewards",
    "precompute_reference_stats",
    "ranking_metrics",
    "ranks_from_order",
    "ranks_from_scores",
    "response_stats",
    "response_token_stats",
    "sequence_logps",
    "token_logps_and_entropy",
    "top_bottom_pair",
]

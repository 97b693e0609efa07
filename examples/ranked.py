"""Shared pieces of the examples: a tiny causal LM, synthetic ranked data, the RCPO step.

Everything here is what a real trainer does with `rcpo_losses`; only the data and the
model size are toys (a randomly initialised Llama with a few layers, no download).
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import Tensor

from rcpo_losses import (
    entropy_dispersion,
    final_hidden_states,
    fused_linear_response_stats,
    lm_head_spec,
    mallows_rmj_topk,
    mnl_topk,
    ranking_metrics,
    ranks_from_scores,
)
from rcpo_losses.tokens.stats import response_token_stats

IGNORE_INDEX = -100


def tiny_llama(vocab_size: int = 96, seed: int = 0):
    """A randomly initialised 2-layer Llama (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def frozen_copy(model):
    """The reference model: a frozen copy of the policy at the start of training."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def policy_reference_batch(seed: int = 0):
    """What the training examples start from: the policy (``tiny_llama``), the reference (its frozen
    copy) and one fixed batch of 8 prompts (``make_ranked_batch``)."""
    policy = tiny_llama(seed=seed)
    return policy, frozen_copy(policy), make_ranked_batch(seed=seed)


def parse_example_args(doc: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The training examples' command line (``doc`` is its help): the arguments of their ``train``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loss", choices=["mallows", "mnl"], default="mallows")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fused-linear",
        action="store_true",
        help="log-probs and entropies from the final hidden states and the LM head, without the logits",
    )
    return parser.parse_args(argv)


def make_ranked_batch(
    num_prompts: int = 8,
    num_responses: int = 4,
    k: int = 2,
    prompt_len: int = 6,
    max_response_len: int = 10,
    vocab_size: int = 96,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Synthetic tokenized ranked data, shaped like a real ranked-preference batch.

    Each prompt has ``num_responses`` responses of random length, right-padded. A hidden
    score (the share of "good" tokens, ids in the lower half of the vocabulary) ranks
    them, and the top ``k`` are kept as feedback. Rows have 2..S responses (padding
    slots are marked IGNORE), as in real data with variable |S|.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` of shape
    ``[B, S, L]`` and ``ranks`` of shape ``[B, S]``.
    """
    g = torch.Generator().manual_seed(seed)
    B, S = num_prompts, num_responses
    L = prompt_len + max_response_len
    prompts = torch.randint(1, vocab_size, (B, 1, prompt_len), generator=g).expand(B, S, prompt_len)
    responses = torch.randint(1, vocab_size, (B, S, max_response_len), generator=g)
    lengths = torch.randint(2, max_response_len + 1, (B, S), generator=g)
    pos = torch.arange(max_response_len)
    in_response = pos < lengths[..., None]
    input_ids = torch.cat([prompts, torch.where(in_response, responses, 0)], dim=-1)
    attention_mask = torch.cat([torch.ones(B, S, prompt_len, dtype=torch.bool), in_response], dim=-1)
    completion_mask = torch.cat([torch.zeros(B, S, prompt_len, dtype=torch.bool), in_response], dim=-1)
    good = ((responses < vocab_size // 2) & in_response).sum(-1) / lengths
    present = torch.ones(B, S, dtype=torch.bool)
    present[:, 2:] = torch.rand(B, S - 2, generator=g) < 0.75  # variable |S| >= 2
    ranks = ranks_from_scores(good + 1e-3 * torch.rand(B, S, generator=g), k, present)
    assert input_ids.shape == (B, S, L)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ranks": ranks,
    }


def response_stats(model, batch: dict[str, Tensor], *, fused_linear: bool = False):
    """Sequence log-probs, entropy sums and lengths ``[B, S]`` of every response.

    ``fused_linear=True`` gets the final, normed hidden states through the model's own
    forward (``final_hidden_states``: DDP-safe, the head forms one position's logits) and
    hands them with the LM head and the model's logit transform (``lm_head_spec``: Gemma-2's
    soft-capping, a logit scale) to ``fused_linear_response_stats``, so the ``[B * S, L, V]``
    logits are never formed. Same numbers as the default path (which takes
    ``model(...).logits``) to fp32 rounding.
    """
    B, S, L = batch["input_ids"].shape
    ids = batch["input_ids"].reshape(B * S, L)
    attention = batch["attention_mask"].reshape(B * S, L)
    mask = batch["completion_mask"].reshape(B * S, L)
    if fused_linear:
        hidden = final_hidden_states(model, ids, attention)
        spec = lm_head_spec(model)
        return fused_linear_response_stats(
            hidden, labels=ids, mask=mask, shift_labels=True, num_responses=S, **spec.as_kwargs()
        )
    logits = model(input_ids=ids, attention_mask=attention).logits
    return response_token_stats(logits, ids, mask, shift_labels=True, num_responses=S)


def rcpo_loss(
    policy,
    reference,
    batch: dict[str, Tensor],
    *,
    loss: str = "mallows",
    beta: float = 0.1,
    fused_linear: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One RCPO training objective on a batch of ranked responses.

    Policy and reference run over the ``B x S`` flattened responses; the per-token
    log-probs (and, for the reference, entropies) come from one pass over the vocabulary
    (`token_logps_and_entropy`); the Mallows weight ``-log phi(x)`` is the reference
    model's entropy dispersion (appendix D). ``fused_linear=True`` computes both models'
    statistics from their final hidden states and LM heads without forming the logits
    (`fused_linear_response_stats`).
    """
    stats = response_stats(policy, batch, fused_linear=fused_linear)
    with torch.no_grad():
        ref = response_stats(reference, batch, fused_linear=fused_linear)
    ranks = batch["ranks"]
    if loss == "mallows":
        vocab_size = reference.config.vocab_size  # the reference is never wrapped (DDP, FSDP)
        neg_log_phi = entropy_dispersion(ref.entropy_sums, ref.lengths, ranks, vocab_size)
        value = mallows_rmj_topk(stats.logps, ref.logps, ranks, beta=beta, neg_log_phi=neg_log_phi)
    elif loss == "mnl":
        value = mnl_topk(stats.logps, ref.logps, ranks, beta=beta)
    else:
        raise ValueError(f"loss: expected 'mallows' or 'mnl', got {loss!r}")
    metrics = ranking_metrics(beta * (stats.logps - ref.logps), ranks)
    return value, metrics

"""``lm_head_spec`` + ``final_hidden_states`` on tiny Llama, Mistral, Gemma-2 (soft-capped) and Cohere (logit
scale) models built from configs: the fused path equals ``model(...).logits`` fed to ``response_token_stats``, to
fp64 rounding, gradients to every parameter included."""

from __future__ import annotations

import pytest
import torch

from rcpo_losses import (
    LMHeadSpec,
    final_hidden_states,
    fused_linear_response_stats,
    lm_head_spec,
    response_token_stats,
)

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=211,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
)


def _model(family: str):
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, tie_word_embeddings=False))
    elif family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=4))
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=16, final_logit_softcapping=30.0)
        model = transformers.Gemma2ForCausalLM(cfg)
    elif family == "cohere":
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**COMMON, logit_scale=0.25))
    model = model.double()
    with torch.no_grad():  # logits of tens, so that the cap (c = 30) and the scale change the log-probs by nats
        head = model.get_output_embeddings().weight
        head.mul_(60.0 / float((final_hidden_states(model, torch.arange(8)[None]) @ head.T).abs().max()))
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, COMMON["vocab_size"], (4, 9), generator=g)
    attention = torch.ones_like(ids)
    attention[1, -3:] = 0  # right padding
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 4:] = True
    mask[1, -3:] = False
    return ids, attention, mask


def _stats_and_grads(model, fused: bool):
    ids, attention, mask = _batch()
    model.zero_grad(set_to_none=True)
    if fused:
        hidden = final_hidden_states(model, ids, attention)
        stats = fused_linear_response_stats(
            hidden,
            labels=ids,
            mask=mask,
            shift_labels=True,
            num_responses=2,
            chunk_size=5,
            **lm_head_spec(model).as_kwargs(),
        )
    else:
        logits = model(ids, attention_mask=attention).logits
        stats = response_token_stats(logits, ids, mask, shift_labels=True, num_responses=2)
    (stats.logps.sum() * 0.7 + stats.entropy_sums.sum() * 0.3).backward()
    return stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "cohere"])
def test_fused_path_with_the_spec_equals_the_models_logits(family):
    model = _model(family)
    spec = lm_head_spec(model)
    assert spec.softcap == (30.0 if family == "gemma2" else None)
    assert spec.logit_scale == (0.25 if family == "cohere" else 1.0)
    assert spec.weight is model.get_output_embeddings().weight
    want, want_grads = _stats_and_grads(model, fused=False)
    got, got_grads = _stats_and_grads(model, fused=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-12)
    assert got_grads.keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-10 * (1 + float(g.abs().max())), rtol=1e-10, msg=name)


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_without_the_transform_the_fused_path_is_nats_off(family):
    """The test above can fail: the raw head's log-probs are far from the model's own."""
    model = _model(family)
    ids, attention, mask = _batch()
    with torch.no_grad():
        hidden = final_hidden_states(model, ids, attention)
        raw = fused_linear_response_stats(hidden, model.get_output_embeddings().weight, ids, mask, shift_labels=True)
        logits = model(ids, attention_mask=attention).logits
        want = response_token_stats(logits, ids, mask, shift_labels=True)
    assert (raw.logps - want.logps).abs().max() > 1.0


class _Wrapper(torch.nn.Module):
    """Stands for DDP: the model in ``.module``, and a forward that calls it."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_wrapped_model_runs_through_the_wrappers_forward():
    model = _model("gemma2")
    wrapped = _Wrapper(model)
    spec = lm_head_spec(wrapped)
    assert isinstance(spec, LMHeadSpec) and spec.weight is model.lm_head.weight and spec.softcap == 30.0
    ids, attention, _ = _batch()
    hidden = final_hidden_states(wrapped, ids, attention)
    assert wrapped.calls == 1
    torch.testing.assert_close(hidden, model.model(ids, attention_mask=attention).last_hidden_state)


def test_not_a_causal_lm():
    with pytest.raises(TypeError, match="model"):
        lm_head_spec(torch.nn.Linear(3, 4))

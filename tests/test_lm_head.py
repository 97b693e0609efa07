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


# ---------------------------------------------------------------- head transforms read from other config fields


def _family(family: str):
    """Tiny models whose forward scales the logits by a config field (transformers 5.x source, read in the test's
    issue): Granite and GraniteMoe divide by ``logits_scaling``, Falcon-H1 multiplies by ``lm_head_multiplier``,
    MPT's config carries a ``logit_scale`` that its forward never applies; HyperCLOVA X multiplies by its
    ``logits_scaling``."""
    torch.manual_seed(0)
    names = {"granite": "Granite", "granitemoe": "GraniteMoe", "falcon_h1": "FalconH1", "mpt": "Mpt"}
    names["hyperclovax"] = "HyperCLOVAX"
    config_cls = getattr(transformers, f"{names[family]}Config", None)
    if config_cls is None:
        pytest.skip(f"the installed transformers {transformers.__version__} has no {names[family]} models")
    model_cls = getattr(transformers, f"{names[family]}ForCausalLM")
    if family == "granite":
        config = config_cls(**COMMON, logits_scaling=8.0)
    elif family == "granitemoe":
        config = config_cls(**COMMON, logits_scaling=6.0, num_local_experts=2, num_experts_per_tok=1)
        config._experts_implementation = "eager"  # fp64: the grouped matmul takes no doubles
    elif family == "hyperclovax":
        config = config_cls(**COMMON, logits_scaling=4.0)
    elif family == "falcon_h1":
        config = config_cls(
            **COMMON, lm_head_multiplier=4.0, head_dim=16, mamba_d_ssm=32, mamba_n_heads=2, mamba_d_head=16,
            mamba_d_state=8, mamba_chunk_size=4,
        )  # fmt: skip
    else:
        config = config_cls(vocab_size=211, d_model=32, n_heads=2, n_layers=2, expansion_ratio=2, max_seq_len=16)
    return model_cls, config


SCALED = {"granite": 1 / 8.0, "granitemoe": 1 / 6.0, "falcon_h1": 4.0, "hyperclovax": 4.0}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family", [*SCALED, "mpt", "mpt-string"])
def test_head_scales_of_granite_falcon_h1_and_mpt(family):
    model_cls, config = _family(family.split("-")[0])
    if family == "mpt":
        config.logit_scale = 0.5  # MPT's forward never applies it
    elif family == "mpt-string":
        config.logit_scale = "inv_sqrt_d_model"  # nor this one, which float() cannot read
    model = model_cls(config).double()
    with torch.no_grad():  # logits of tens, so that a missed scale is nats off
        head = model.get_output_embeddings().weight
        head.mul_(60.0 / float((final_hidden_states(model, torch.arange(8)[None]) @ head.T).abs().max()))
    spec = lm_head_spec(model)
    assert spec.logit_scale == pytest.approx(SCALED.get(family, 1.0), rel=1e-15) and spec.softcap is None
    want, want_grads = _stats_and_grads(model, fused=False)
    got, got_grads = _stats_and_grads(model, fused=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-12)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-9 * (1 + float(g.abs().max())), rtol=1e-9, msg=name)
    if family in SCALED:  # the scale matters: without it the log-probs are nats off
        ids, attention, mask = _batch()
        with torch.no_grad():
            raw = fused_linear_response_stats(final_hidden_states(model, ids, attention), head, ids, mask,
                                              shift_labels=True)  # fmt: skip
        assert (raw.logps - want.logps.reshape(-1)).abs().max() > 1.0


# ---------------------------------------------------------------- the first-seen check against model(...).logits


class _TripledHead(torch.nn.Module):
    """A custom head whose transform (x 3) no config field tells."""

    def __init__(self, head):
        super().__init__()
        self.weight = head.weight

    def forward(self, x):
        return 3.0 * torch.nn.functional.linear(x, self.weight)


class _Counting(torch.nn.Module):
    """Counts the forwards of the model inside it (and passes get_output_embeddings / config through)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.forwards = 0

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return self.inner(*args, **kwargs)


def _custom_head_model():
    model = _model("llama")
    model.lm_head = _TripledHead(model.lm_head)
    return model


def test_a_head_transform_the_spec_cannot_know_raises_naming_the_model():
    model = _custom_head_model()
    with pytest.raises(ValueError, match=r"model: LlamaForCausalLM\(lm_head=_TripledHead\).*logits"):
        lm_head_spec(model)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):  # a failure is not cached as seen
        lm_head_spec(model)
    assert lm_head_spec(model, verify=False).weight is model.lm_head.weight  # documented way out


def test_the_module_switch_turns_the_check_off(monkeypatch):
    import rcpo_losses.tokens.lm_head as lm_head

    monkeypatch.setattr(lm_head, "VERIFY", False)
    assert lm_head_spec(_custom_head_model()).logit_scale == 1.0
    monkeypatch.setattr(lm_head, "VERIFY", True)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        lm_head_spec(_custom_head_model())


def test_the_check_runs_once_per_class_and_config_and_leaves_the_model_as_it_was(monkeypatch):
    import rcpo_losses.tokens.lm_head as lm_head

    monkeypatch.setattr(lm_head, "_VERIFIED", set())
    model = _Counting(_model("gemma2"))
    model.train()
    model.inner.model.layers[0].eval()  # a mixed train/eval state, restored as it was
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    lm_head_spec(model)
    assert model.forwards == 1
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    lm_head_spec(model)
    lm_head_spec(_Counting(_model("gemma2")))  # same class, same config: already seen
    assert model.forwards == 1
    other = _Counting(_model("gemma2"))
    other.config.final_logit_softcapping = 20.0  # a different config is checked again
    lm_head_spec(other)
    assert other.forwards == 1
    other.config.pad_token_id, other.config.eos_token_id = 0, 3  # as Trainer aligns them to the tokenizer
    lm_head_spec(other)
    other.config._attn_implementation = "eager"  # nor does the attention implementation
    lm_head_spec(other)
    assert other.forwards == 1  # special token ids do not change the logits: not checked again
    ids, attention, _ = _batch()
    hidden = final_hidden_states(model, ids, attention)  # grads and a backward are not disturbed
    z = torch.nn.functional.linear(hidden, lm_head_spec(model).weight)
    z.sum().backward()
    assert model.inner.lm_head.weight.grad is not None


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_check_runs_under_the_autocast_of_the_forward(monkeypatch, device, dtype):
    """As accelerate wraps the forward (Trainer's bf16 / fp16): autocast inside, fp32 outputs, none outside."""
    import rcpo_losses.tokens.lm_head as lm_head

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from accelerate.utils import convert_outputs_to_fp32

    def wrapped(model):
        model = model.float().to(device)
        model.forward = convert_outputs_to_fp32(torch.autocast(device, dtype=dtype)(model.forward))
        return model

    monkeypatch.setattr(lm_head, "_VERIFIED", set())
    model = wrapped(_model("gemma2"))
    assert model(torch.arange(4, device=device)[None]).logits.dtype == torch.float32
    assert lm_head_spec(model).softcap == 30.0
    with pytest.raises(ValueError, match=r"LlamaForCausalLM\(lm_head=_TripledHead\)"):  # still caught under autocast
        lm_head_spec(wrapped(_custom_head_model()))

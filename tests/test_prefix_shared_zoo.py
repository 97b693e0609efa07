"""The prefix-shared layout on a zoo of decoder families, built from configs (no download).

Every family either runs prefix-shared with statistics equal to the padded layout's (fp64,
values and gradients, fused and unfused head, sequences longer than every sliding window
and chunk) or is refused by name. No family is named in rcpo_losses: the masks come from
each config's ``layer_types`` and the first-seen probe (``check_prefix_shared``) decides.
"""

from __future__ import annotations

import copy
import logging
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")

import rcpo_losses.ops.backend as backend  # noqa: E402
import rcpo_losses.training.model_stats as model_stats  # noqa: E402
from rcpo_losses import IGNORE, response_stats  # noqa: E402
from rcpo_losses.training.data import RankedPreferenceCollator  # noqa: E402
from rcpo_losses.training.model_stats import check_prefix_shared, layer_masks  # noqa: E402
from rcpo_losses.training.packing import dense_attention_mask  # noqa: E402
from tests.test_prefix_shared import (  # noqa: E402
    WINDOW,
    IntTokenizer,
    fp64_norms,
    fp64_softmax,  # noqa: F401 (a fixture)
    random_rows,
    stats_and_grads,
)

V = 97
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)  # fmt: skip
SLIDING = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)  # Qwen: layer 0 full, 1 sliding
MIXED = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=WINDOW)

# family: (config class, its own arguments)
ZOO = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", SLIDING),
    "qwen3": ("Qwen3Config", SLIDING),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, **SLIDING)),
    "gemma": ("GemmaConfig", dict(head_dim=8)),
    "gemma2": (
        "Gemma2Config",
        dict(
            attn="eager",
            head_dim=8,
            query_pre_attn_scalar=8,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            **MIXED,
        ),
    ),  # fmt: skip
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=3.0, **MIXED),
    ),
    "phi3": ("Phi3Config", dict(sliding_window=WINDOW)),
    "olmo2": ("Olmo2Config", {}),
    "granite": (
        "GraniteConfig",
        dict(logits_scaling=2.0, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3),
    ),  # fmt: skip
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0], **SLIDING)),  # layer 1 without RoPE
    # chunked attention (chunks of WINDOW positions), no temperature tuning: see test_llama4_temperature_tuning
    "llama4_text": (
        "Llama4TextConfig",
        dict(
            attention_chunk_size=WINDOW,
            layer_types=["chunked_attention", "full_attention"],
            no_rope_layers=[1, 0],
            num_local_experts=2,
            intermediate_size_mlp=48,
            attn_temperature_tuning=False,
            head_dim=8,
        ),
    ),  # fmt: skip
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),  # learned absolute positions
}
REFUSED = {"bloom": ("BloomConfig", dict(n_layer=2, n_head=4)), "falcon_alibi": ("FalconConfig", dict(alibi=True))}
# sdpa families whose attention the segments cannot reach (Falcon, StableLM and Nemotron keep the forward's keyword
# arguments from it or build on the mask; Doge passes its own mask): the dense mask serves them
DENSE_MASK = {
    "falcon": ("FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "stablelm": ("StableLmConfig", {}),
    "nemotron": ("NemotronConfig", {}),
    "doge": ("DogeConfig", {}),
}
# behaviour that changes at a length no mask encodes (tests of the probe's reach)
LENGTHS = {
    "gpt_neo": ("GPTNeoConfig", dict(attn="eager", attention_types=[[["global", "local"], 1]], window_size=24,
                                     max_position_embeddings=256)),
    "llama4_floor_scale": ("Llama4TextConfig", {**ZOO["llama4_text"][1], "attention_chunk_size": None,
                                                "layer_types": ["full_attention"] * 2, "attn_temperature_tuning": True,
                                                "floor_scale": 40}),
    "phi3_longrope": ("Phi3Config", dict(max_position_embeddings=128, original_max_position_embeddings=32,
                                         rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                          "original_max_position_embeddings": 32,
                                                          "short_factor": [1.0] * 4,
                                                          "long_factor": [3.0, 5.0, 7.0, 9.0]})),
    "llama_dynamic": ("LlamaConfig", dict(max_position_embeddings=32, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
}  # fmt: skip


def zoo_model(family: str, dtype: torch.dtype = torch.float64, attn: str = "sdpa", scaled: bool = True, **extra):
    """``scaled``: larger logits and attention scores than the initial weights (so that soft-caps and masks matter)."""
    name, kwargs = {**ZOO, **REFUSED, **DENSE_MASK, **LENGTHS}[family]
    kwargs = {**COMMON, **kwargs, **extra}
    attn = kwargs.pop("attn", attn)  # Gemma-2's soft-capped attention has no sdpa
    torch.manual_seed(0)
    config = getattr(transformers, name)(**kwargs)
    # eager experts: the grouped-GEMM ones take no fp64
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation=attn, experts_implementation="eager"
    ).to(dtype)
    model.eval()  # no dropout (GPT-2's); gradients still flow
    with torch.no_grad():
        if scaled:
            model.get_output_embeddings().weight.mul_(8.0)
        for n, p in model.named_parameters():
            if scaled and any(s in n for s in ("q_proj", "k_proj", "c_attn")):
                p.mul_(4.0)
    return model


def rows_of(prompt: int, completions: list[int], seed: int = 0) -> list[dict]:
    """One row: a prompt of ``prompt`` tokens (and BOS), completions of these lengths (and EOS)."""
    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> str:
        return " ".join(str(int(t)) for t in torch.randint(3, V, (n,), generator=g))

    return [{"prompt": text(prompt), "completions": [text(n) for n in completions],
             "ranking": list(range(len(completions)))}]  # fmt: skip


@pytest.fixture
def fresh_checks(monkeypatch):
    """The first-seen probe runs again in this test (models of one config are checked once per process)."""
    monkeypatch.setattr(model_stats, "_VERIFIED", weakref.WeakKeyDictionary())


@pytest.mark.usefixtures("fp64_softmax")
@pytest.mark.parametrize("attention", ["segments", "dense"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("family", list(ZOO))
def test_zoo_prefix_shared_equals_padded(family, fused, attention, fresh_checks, monkeypatch):
    """``attention``: the segment attention where it applies (every sdpa family), or the dense mask everywhere."""
    rows = random_rows()
    padded = RankedPreferenceCollator(IntTokenizer(), k=3)(rows)
    packed = RankedPreferenceCollator(IntTokenizer(), k=3, layout="prefix_shared")(rows)
    assert (padded["ranks"] == IGNORE).any() and padded["input_ids"].shape[-1] > 2 * WINDOW
    model = zoo_model(family)
    assert all(w in (None, WINDOW) and c in (None, WINDOW) for w, c in layer_masks(model.config).values())
    fp64_norms(model)
    monkeypatch.setattr(backend, "CPU_SEGMENT_ATTENTION", attention == "segments")
    built = []
    segments = model_stats.segments
    monkeypatch.setattr(model_stats, "segments", lambda *args: built.append(1) or segments(*args))
    want, want_grads = stats_and_grads(model, padded, fused)
    got, got_grads = stats_and_grads(model, packed, fused)
    assert len(model_stats._VERIFIED) == 1  # the probe ran, and passed
    assert bool(built) == (attention == "segments" and model.config._attn_implementation == "sdpa")
    tol = dict(rtol=1e-10, atol=1e-10)
    assert torch.equal(got.lengths, want.lengths)
    torch.testing.assert_close(got.logps, want.logps, **tol)
    torch.testing.assert_close(got.entropy_sums, want.entropy_sums, **tol)
    assert want_grads.keys() == got_grads.keys() and want_grads
    if family == "llama4_text":  # its router's sigmoid and its complex RoPE compute in fp32 whatever the dtype
        tol = dict(rtol=1e-7, atol=1e-6)  # 1e-8 of the largest gradient
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **tol, msg=name)


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma3_text", "llama4_text"])
def test_zoo_windows_and_chunks_matter(family):
    """The windows and chunks cut into these sequences: a mask without them changes the result."""
    packed = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(random_rows())
    model = zoo_model(family)
    ids, pos = packed["input_ids"], packed["position_ids"]
    with torch.no_grad():
        right = model(ids, attention_mask=model_stats._attention_mask(model, packed), position_ids=pos).logits
        wrong = model(ids, attention_mask=dense_attention_mask(packed), position_ids=pos).logits
    assert (right - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("family", list(REFUSED))
def test_alibi_families_are_refused_by_name(family):
    model = zoo_model(family, torch.float32, attn="eager")
    packed = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(random_rows())
    with pytest.raises(ValueError, match=r"uses ALiBi.*layout='padded'"):
        response_stats(model, packed)
    padded = RankedPreferenceCollator(IntTokenizer())(random_rows())
    assert response_stats(model, padded).logps.shape == padded["ranks"].shape  # the padded layout still works


def test_llama4_temperature_tuning_is_caught(fresh_checks):
    """Llama-4's NoPE layers scale queries by the sequence index (arange), not the position id: the probe sees it."""
    model = zoo_model("llama4_text", torch.float32, attn_temperature_tuning=True, floor_scale=4)
    with pytest.raises(ValueError, match=r"Llama4ForCausalLM \('llama4_text'\).*other hidden states"):
        check_prefix_shared(model)
    assert not model_stats._VERIFIED


def index_biased_attention(monkeypatch):
    """Llama's eager attention plus an ALiBi-like bias on the distance in the sequence, not in position ids."""
    from transformers.models.llama import modeling_llama

    eager = modeling_llama.eager_attention_forward

    def biased(module, query, key, value, attention_mask, **kwargs):
        i = torch.arange(query.shape[-2], device=query.device)
        bias = -0.5 * (i[:, None] - i[None, :]).abs().to(query.dtype)
        return eager(module, query, key, value, attention_mask + bias, **kwargs)

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", biased)


def test_a_family_the_mask_gets_wrong_is_caught(monkeypatch, fresh_checks):
    index_biased_attention(monkeypatch)
    model = zoo_model("llama", torch.float32, attn="eager")
    packed = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(random_rows())
    padded = RankedPreferenceCollator(IntTokenizer())(random_rows())
    with pytest.raises(ValueError, match=r"LlamaForCausalLM \('llama'\) with attention implementation 'eager'"):
        response_stats(model, packed)
    # what the check prevents: with it off, the packed statistics are silently different
    with torch.no_grad():
        monkeypatch.setattr(model_stats, "VERIFY", False)
        wrong = response_stats(model, packed).logps
        right = response_stats(model, padded).logps
    assert (wrong - right).abs().max() > 1e-2


def test_trainer_falls_back_on_a_failed_check_with_one_line(monkeypatch, fresh_checks, tmp_path, caplog):
    from rcpo_losses.training.trainer import RCPOTrainer

    index_biased_attention(monkeypatch)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    model = zoo_model("llama", torch.float32, attn="eager")
    with caplog.at_level(logging.INFO, logger="rcpo_losses.training.trainer"):
        trainer = RCPOTrainer(model, args=args, processing_class=IntTokenizer())
    assert trainer.data_collator.layout == "padded"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "other hidden states" in lines[0] and "falling back to layout='padded'" in lines[0]


def test_the_check_runs_once_per_model_and_can_be_turned_off(monkeypatch, fresh_checks):
    calls = []
    probe = model_stats._probe
    monkeypatch.setattr(model_stats, "_probe", lambda m, *args, **kwargs: calls.append(m) or probe(m, *args, **kwargs))
    packed = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(random_rows())
    model = zoo_model("qwen3", torch.float32)
    with torch.no_grad():
        for _ in range(3):
            response_stats(model, packed)
        assert len(calls) == 1
        response_stats(zoo_model("qwen3", torch.float32), packed)  # another instance: its weights may differ
        assert len(calls) == 2
        model.config.sliding_window = WINDOW + 1  # another config
        response_stats(model, packed)
        assert len(calls) == 3
        model.set_attn_implementation("eager")  # another attention implementation
        response_stats(model, packed)
        assert len(calls) == 4
        model.to(torch.float64)  # other dtypes
        response_stats(model, packed)
        assert len(calls) == 5
        monkeypatch.setattr(model_stats, "VERIFY", False)
        response_stats(zoo_model("qwen3", torch.float32, sliding_window=WINDOW + 2), packed)
        assert len(calls) == 5


def test_a_verdict_covers_only_its_model_instance_and_dtype(fresh_checks):
    """Llama-4 with temperature tuning passes the probe in bf16 (within its tolerance) and with its initial weights
    (a difference hidden under small weights): neither verdict covers the fp32 model with larger weights."""
    model = zoo_model("llama4_text", torch.float32, attn_temperature_tuning=True, floor_scale=4)
    check_prefix_shared(model.to(torch.bfloat16))
    check_prefix_shared(zoo_model("llama4_text", torch.float32, scaled=False, attn_temperature_tuning=True,
                                  floor_scale=4))  # fmt: skip
    with pytest.raises(ValueError, match="other hidden states"):
        check_prefix_shared(model.to(torch.float32))


@pytest.mark.parametrize(
    ("family", "field"), [("gpt_neo", "window_size = 24"), ("llama4_floor_scale", "floor_scale = 40")]
)
def test_the_probe_reaches_every_length_a_batch_reaches(family, field, fresh_checks):
    """A length where the model changes behaviour and no mask encodes (GPT-Neo's local ``window_size``, Llama-4's
    ``floor_scale`` without chunks) is past the first probe; a batch that reaches it gets a probe that does too."""
    model = zoo_model(family)
    short = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(rows_of(4, [8, 6]))
    long = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(rows_of(10, [30, 5, 12]))
    assert short["input_ids"].shape[-1] < 24 and long["position_ids"].max() > 24 and long["input_ids"].shape[-1] > 40
    with torch.no_grad():
        response_stats(model, short)  # shorter than the threshold: as exact as the padded layout
        with pytest.raises(ValueError, match=rf"other hidden states .* \(past .*{field}"):
            response_stats(model, long)


def test_sharded_ranks_probe_the_longest_batch_of_any_rank(monkeypatch, fresh_checks, tmp_path):
    """A sharded model's forward gathers parameters from every rank: all run the same probe, or none. This rank's
    batch is short; another's reaches GPT-Neo's window (the all-reduce's answer): the probe here reaches it too."""
    model = zoo_model("gpt_neo")
    short = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(rows_of(4, [8, 6]))
    asked = []
    monkeypatch.setattr(model_stats, "_sharded", lambda m: True)
    monkeypatch.setattr(model_stats, "_largest_across_ranks", lambda *v: asked.append(v) or (max(v[0], 41), 30, 30))
    with torch.no_grad(), pytest.raises(ValueError, match="window_size = 24"):
        response_stats(model, short)
    assert asked and max(v[1] for v in asked) < 24
    monkeypatch.undo()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert model_stats._largest_across_ranks(5, 7, 0) == (5, 7, 0)
    finally:
        torch.distributed.destroy_process_group()


def test_length_thresholds():
    config = transformers.Phi3Config(**COMMON, sliding_window=7, original_max_position_embeddings=16, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 16,
        "short_factor": [1.0] * 4, "long_factor": [2.0] * 4})  # fmt: skip
    config.sub = transformers.LlamaConfig(window_size=3)  # a sub-config
    config.use_long = True  # a bool is no length
    got = model_stats.length_thresholds(config)
    assert got["config.sliding_window"] == 7 and got["config.max_position_embeddings"] == 64
    assert got["config.rope_parameters['original_max_position_embeddings']"] == 16
    assert got["config.sub.window_size"] == 3 and "config.vocab_size" not in got and "config.use_long" not in got


@pytest.mark.parametrize("family", ["phi3_longrope", "llama_dynamic"])
def test_rope_scaled_by_the_length_equals_padded_at_the_threshold(family, fresh_checks):
    """The longest sequence one past where the RoPE switches (longrope's original_max_position_embeddings, dynamic
    NTK's max_position_embeddings: 32): both layouts see that length. A fresh model each (dynamic NTK keeps state)."""
    rows = rows_of(9, [22, 3, 9])  # BOS + 9 + 22 + EOS = 33
    padded = RankedPreferenceCollator(IntTokenizer())(rows)
    packed = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(rows)
    assert padded["input_ids"].shape[-1] == 33
    models = [zoo_model(family), zoo_model(family)]
    for model in models:
        fp64_norms(model)
    want, want_grads = stats_and_grads(models[0], padded, True)
    got, got_grads = stats_and_grads(models[1], packed, True)
    torch.testing.assert_close(got.logps, want.logps, rtol=1e-10, atol=1e-10)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-9, atol=1e-9, msg=name)


def test_a_step_first_reached_inside_torch_compile_runs_the_probe(fresh_checks):
    model = zoo_model("llama4_text", torch.float32, attn_temperature_tuning=True, floor_scale=4)
    packed = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(random_rows())
    step = torch.compile(lambda batch: response_stats(model, batch).logps.sum(), backend="eager")
    with torch.no_grad(), pytest.raises(ValueError, match=r"Llama4ForCausalLM \('llama4_text'\).*other hidden states"):
        step(packed)
    model = zoo_model("llama", num_hidden_layers=1)  # a family that passes: the compiled step gives eager numbers
    with torch.no_grad():
        torch.testing.assert_close(step(packed), response_stats(model, packed).logps.sum(), rtol=1e-12, atol=1e-12)
    sdpa = transformers.AttentionInterface._global_mapping["sdpa"]
    assert sdpa.rcpo_segments and not getattr(sdpa.__wrapped__, "rcpo_segments", False)  # wrapped once


@pytest.mark.parametrize("family", list(DENSE_MASK))
def test_families_the_segments_cannot_reach_take_the_dense_mask(family, fresh_checks):
    """Not refused (nor sent back to padded): the probe finds the segments wrong and the dense mask exact."""
    rows = random_rows()
    padded = RankedPreferenceCollator(IntTokenizer(), k=3)(rows)
    packed = RankedPreferenceCollator(IntTokenizer(), k=3, layout="prefix_shared")(rows)
    model = zoo_model(family)
    fp64_norms(model)
    assert model_stats.segment_attention_possible(model)
    want, want_grads = stats_and_grads(model, padded, True)
    got, got_grads = stats_and_grads(model, packed, True)
    assert [v.segments for v in model_stats._VERIFIED[model].values()] == [False]
    torch.testing.assert_close(got.logps, want.logps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.entropy_sums, want.entropy_sums, rtol=1e-10, atol=1e-10)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-9, atol=1e-9, msg=name)


def test_probe_completions_outrun_every_window_and_chunk():
    config = zoo_model("gemma3_text", torch.float32, sliding_window=11).config
    prompts, completions = model_stats._probe_rows(config, V)
    assert max(len(c) for cs in completions for c in cs) > 11 and min(len(c) for cs in completions for c in cs) == 1
    assert len({len(cs) for cs in completions}) > 1  # rows of different S
    # a batch's reach: the longest sequence and the packed length, sequences no longer than the batch's own
    prompts, completions = model_stats._probe_rows(config, V, tokens=300, length=30, filler=40)
    tokens, longest = model_stats._rows_reach(prompts, completions)
    assert tokens >= 300 and longest == 40 and len(completions[1]) < 12


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "llama-flash_attention_2"])
def test_trainer_trains_prefix_shared_by_default(family, tmp_path, monkeypatch, fresh_checks):
    from rcpo_losses.training.trainer import RCPOTrainer

    flash = family.endswith("flash_attention_2")
    model = zoo_model(family.split("-")[0], torch.float32, attn="eager" if family == "gemma3_text" else "sdpa")
    if flash:
        model.config._attn_implementation = "flash_attention_2"  # as loaded with it (flash_attn is not installed)
    seen = []  # (layout, attention implementation) of each forward the trainer ran
    stats = RCPOTrainer.response_stats

    def spy(self, m, inputs, **kwargs):
        seen.append(("prefix_shared" if "target_index" in inputs else "padded", m.config._attn_implementation))
        return stats(self, m, inputs, **kwargs)

    monkeypatch.setattr(RCPOTrainer, "response_stats", spy)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2, per_device_train_batch_size=2,
        save_strategy="no", logging_steps=1,
    )  # fmt: skip
    trainer = RCPOTrainer(model, args=args, train_dataset=random_rows(0) + random_rows(1),
                          processing_class=IntTokenizer(), beta=0.5)  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert trainer.data_collator.layout == "prefix_shared" and trainer.switch_attention == flash
    assert set(seen) == {("prefix_shared", "sdpa" if flash else model.config._attn_implementation)}
    assert len(seen) == 4  # policy and reference, two steps
    assert model.config._attn_implementation == ("flash_attention_2" if flash else model.config._attn_implementation)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_the_probe_tolerance_follows_autocast_inside_the_forward(fresh_checks, monkeypatch):
    """An fp32 model whose forward runs under bf16 autocast (accelerate wraps it so) gets the half tolerance."""
    # the dense mask: the segment attention computes each probe sequence exactly as alone, with no rounding to see
    monkeypatch.setattr(backend, "CPU_SEGMENT_ATTENTION", False)
    model = zoo_model("mistral", torch.float32)
    plain = model_stats._probe(model)
    forward = model.forward

    def autocast_forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    model.forward = autocast_forward
    err, scale, eps = model_stats._probe(model)
    assert plain[2] == 2e-3 and eps == 4e-2  # fp32, then autocast seen inside the forward
    assert plain[0] <= 1e-5 * plain[1] < err <= eps * scale  # bf16 rounding, within the half tolerance
    check_prefix_shared(model)


def test_other_refusals_by_name():
    """Encoder-decoders, multimodal wrappers, forwards without position_ids: refused before any probe."""
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=V, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    )
    assert "is an encoder-decoder" in model_stats.prefix_shared_support(t5)

    class NoPositions(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):  # positions from the sequence index
            return super().forward(input_ids, attention_mask=attention_mask, **kwargs)

    model = zoo_model("llama", torch.float32)
    assert model_stats.prefix_shared_support(model) is None
    assert "forward takes no position_ids" in model_stats.prefix_shared_support(NoPositions(model.config))
    wrapper = zoo_model("llama", torch.float32)
    text = copy.deepcopy(wrapper.config)
    object.__setattr__(wrapper.config, "get_text_config", lambda *args, **kwargs: text)
    assert "is a multimodal wrapper" in model_stats.prefix_shared_support(wrapper)
    recurrent = zoo_model("llama", torch.float32)
    recurrent.config.layer_types = ["full_attention", "linear_attention"]
    assert "['linear_attention'] whose state runs along the sequence" in model_stats.prefix_shared_support(recurrent)
    recurrent.config.layer_types = ["full_attention", "some_new_attention"]
    with pytest.raises(ValueError, match="layer type 'some_new_attention' is not one the prefix-shared mask encodes"):
        check_prefix_shared(recurrent)

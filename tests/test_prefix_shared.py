"""The prefix-shared packed layout and ``response_stats``: equal to the padded layout, values and gradients.

Tiny Llama, Mistral, Qwen2 and Gemma-2 models from configs (no download), with sliding
windows shorter than the sequences where the family has them; fp32 and fp64, fused and
unfused LM head; rows of different S, k and lengths, a one-token completion.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

import rcpo_losses.training.model_stats as model_stats  # noqa: E402
from rcpo_losses import IGNORE, response_stats  # noqa: E402
from rcpo_losses.training.data import RankedPreferenceCollator  # noqa: E402
from rcpo_losses.training.model_stats import (  # noqa: E402
    attention_implementation,
    check_prefix_shared,
    mask_attention_implementation,
    prefix_shared_attention_mask,
)
from rcpo_losses.training.packing import (  # noqa: E402
    attended_pairs,
    dense_attention_mask,
    flex_block_mask,
    pack_prefix_shared,
    prefix_shared_mask_mod,
)

V = 97
WINDOW = 5  # shorter than most sequences below (prompt + completion up to 17 tokens)


class IntTokenizer:
    """A tokenizer of space-separated integers: ``"5 7 9"`` is ``[5, 7, 9]``; BOS 1, EOS 2."""

    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = True):
        return {"input_ids": ([1] if add_special_tokens else []) + [int(t) for t in text.split()]}


def random_rows(seed: int = 0) -> list[dict]:
    """Rows of 2 to 4 completions (one of a single token: the EOS alone), top-k lists of several k."""
    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> str:
        return " ".join(str(int(t)) for t in torch.randint(3, V, (n,), generator=g))

    return [
        {"prompt": text(6), "completions": [text(9), "", text(4)], "ranking": [2, 0, 1]},
        {"prompt": text(3), "completions": [text(12), text(2)], "ranking": [1]},
        {"prompt": text(9), "completions": [text(1), text(7), text(11), text(5)], "scores": [0.1, 2.0, -1.0, 0.5]},
        {"prompt": text(1), "completions": [text(13), text(3), text(8)], "ranking": [0, 2]},
    ]


def tiny_model(family: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    if family == "llama":
        config = transformers.LlamaConfig(**common)
    elif family == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=WINDOW)
    elif family == "qwen2":  # layer 0 full, layer 1 sliding
        config = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    elif family == "gemma2":  # alternating sliding / full layers, attention and final soft-capping
        config = transformers.Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
                                           attn_logit_softcapping=2.0, final_logit_softcapping=3.0)  # fmt: skip
    else:
        raise ValueError(family)
    config._attn_implementation = attn
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).to(dtype)
    with torch.no_grad():  # larger logits and attention scores, so that soft-caps and masks matter
        model.get_output_embeddings().weight.mul_(8.0)
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(4.0)
    return model


def fp64_norms(model) -> None:
    """Make the RMSNorms compute in the model's dtype: Hugging Face casts to fp32 inside them, even for fp64.

    The same formula (Gemma-2 scales by ``1 + weight``); without this an fp64 model is only
    fp32-precise, and a gradient summed in another order rounds differently there.
    """
    for module in model.modules():
        if type(module).__name__.endswith(("RMSNorm", "L2Norm")):  # L2Norm: Llama-4's, no weight
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            gemma = type(module).__name__.startswith("Gemma")

            def forward(x, module=module, eps=eps, gemma=gemma):
                y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
                if not hasattr(module, "weight"):
                    return y
                return y * (1.0 + module.weight) if gemma else module.weight * y

            module.forward = forward


@pytest.fixture
def fp64_softmax(monkeypatch):
    """Eager attention's softmax in fp64 for fp64 scores (Hugging Face asks for fp32 whatever the input)."""
    softmax = torch.nn.functional.softmax

    def exact(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=torch.float64 if x.dtype == torch.float64 else dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", exact)


def stats_and_grads(model, batch, fused: bool):
    model.zero_grad(set_to_none=True)
    stats = response_stats(model, batch, fused_linear=fused)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(stats.logps.shape, generator=g, dtype=stats.logps.dtype)
    ((w * stats.logps).sum() + (w.flip(0) * stats.entropy_sums).sum()).backward()
    return stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"), ("qwen2", "sdpa"), ("gemma2", "eager")]


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(("family", "attn"), CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_prefix_shared_equals_padded(family, attn, dtype, fused, fp64_softmax):
    rows = random_rows()
    padded = RankedPreferenceCollator(IntTokenizer(), k=3)(rows)
    packed = RankedPreferenceCollator(IntTokenizer(), k=3, layout="prefix_shared")(rows)
    assert torch.equal(packed["ranks"], padded["ranks"]) and (padded["ranks"] == IGNORE).any()
    assert padded["input_ids"].shape[-1] > 2 * WINDOW  # the windows cut into the sequences
    model = tiny_model(family, attn, dtype)
    if dtype == torch.float64:
        fp64_norms(model)
    want, want_grads = stats_and_grads(model, padded, fused)
    got, got_grads = stats_and_grads(model, packed, fused)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    assert torch.equal(got.lengths, want.lengths)
    assert torch.equal(want.lengths, padded["completion_mask"].sum(-1))
    torch.testing.assert_close(got.logps, want.logps, **tol)
    torch.testing.assert_close(got.entropy_sums, want.entropy_sums, **tol)
    assert (want.logps[padded["ranks"] == IGNORE] == 0).all()
    assert want_grads.keys() == got_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **tol, msg=name)


def test_the_windows_change_the_result():
    """Without the sliding window in the mask, Mistral's packed stats differ: the test above would catch it."""
    rows = random_rows()
    packed = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(rows)
    model = tiny_model("mistral", dtype=torch.float64)
    with torch.no_grad():
        windowed = response_stats(model, packed).logps
        model.config.sliding_window = None
        full = response_stats(model, packed).logps
    assert (windowed - full).abs().max() > 1e-3


@given(
    st.lists(st.tuples(st.integers(1, 6), st.lists(st.integers(1, 6), min_size=1, max_size=4)), min_size=1, max_size=4),
    st.sampled_from([None, 1, 3]),
)
def test_each_target_sees_exactly_its_prompt_and_completion_prefix(shape, window):
    """Independent of the mask rule: what a target's hidden row attends to is its padded context."""
    S = max(len(c) for _, c in shape)
    prompts = [[100 * b + t for t in range(n)] for b, (n, _) in enumerate(shape)]
    outs = [
        [[100 * b + 10 * (j + 1) + t for t in range(m)] for j, m in enumerate(ms)] for b, (_, ms) in enumerate(shape)
    ]
    batch = pack_prefix_shared(prompts, outs, S)
    ids, pos = batch["input_ids"][0], batch["position_ids"][0]
    mask = dense_attention_mask(batch, sliding_window=window)[0, 0]
    assert ids.numel() == sum(len(p) + sum(map(len, cs)) for p, cs in zip(prompts, outs, strict=True))
    k = 0
    for b, (prompt, cs) in enumerate(zip(prompts, outs, strict=True)):
        for j, c in enumerate(cs):
            for t, token in enumerate(c):
                assert batch["target_ids"][k] == token and batch["target_response"][k] == b * S + j
                q = int(batch["target_index"][k])
                context = prompt + c[:t]  # what predicts c[t] in the padded layout, at positions 0..len - 1
                seen = mask[q].nonzero()[:, 0]
                want = list(range(len(context)))
                if window is not None:
                    want = want[max(0, len(context) - window) :]
                assert pos[q] == len(context) - 1
                assert ids[seen].tolist() == [context[i] for i in want] and pos[seen].tolist() == want
                k += 1
    assert k == batch["target_ids"].numel()
    assert attended_pairs(batch) == int(dense_attention_mask(batch).sum())


def test_block_mask_on_cpu_matches_the_dense_mask():
    """The CUDA path's BlockMask, built on the CPU: its blocks cover exactly the dense mask's pairs."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    batch = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(random_rows())
    dense = dense_attention_mask(batch, sliding_window=WINDOW)[0, 0]
    block = flex_block_mask(batch, sliding_window=WINDOW, block_size=8)
    P = dense.shape[0]
    assert tuple(block.shape) == (1, 1, P, P)
    covered = block.to_dense()[0, 0].repeat_interleave(8, 0).repeat_interleave(8, 1)[:P, :P].bool()
    assert (covered >= dense).all()  # no attended pair in a skipped block
    rule = prefix_shared_mask_mod(batch["row_index"], batch["response_index"], batch["position_ids"], WINDOW)
    q, kv = dense.nonzero(as_tuple=True)
    assert bool(rule(0, 0, q, kv).all()) and int(
        rule(0, 0, *torch.ones_like(dense).nonzero(as_tuple=True)).sum()
    ) == int(dense.sum())


def test_what_each_attention_implementation_receives():
    batch = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(random_rows())
    P = batch["input_ids"].shape[-1]
    sdpa = prefix_shared_attention_mask(tiny_model("llama", "sdpa"), batch)
    assert sdpa.dtype == torch.bool and sdpa.shape == (1, 1, P, P)
    eager = prefix_shared_attention_mask(tiny_model("llama", "eager", torch.float64), batch)
    assert eager.dtype == torch.float64 and set(eager.unique().tolist()) == {0.0, torch.finfo(torch.float64).min}
    gemma = prefix_shared_attention_mask(tiny_model("gemma2", "eager"), batch)
    assert set(gemma) == {"full_attention", "sliding_attention"}
    assert (gemma["sliding_attention"] <= gemma["full_attention"]).all()
    assert (gemma["sliding_attention"] != gemma["full_attention"]).any()


def test_refused_attention_implementation():
    batch = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(random_rows())
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"  # ignores custom masks: would attend across completions
    with pytest.raises(
        ValueError, match=r"LlamaForCausalLM \('llama'\) with attention implementation 'flash_attention_2'"
    ):
        response_stats(model, batch)
    assert mask_attention_implementation(model) == "sdpa"  # what RCPOTrainer steps it with on the CPU
    with attention_implementation(model, "sdpa"):
        assert model.config._attn_implementation == "sdpa"
        check_prefix_shared(model)
    assert model.config._attn_implementation == "flash_attention_2"  # restored, without a new availability check


def test_trainer_switches_a_kernel_without_masks_with_one_logged_line(tmp_path, caplog):
    from rcpo_losses.training.trainer import RCPOTrainer

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with caplog.at_level(logging.INFO, logger="rcpo_losses.training.trainer"):
        trainer = RCPOTrainer(model, args=args, processing_class=IntTokenizer(), ref_model=tiny_model("llama"))
    assert trainer.data_collator.layout == "prefix_shared" and trainer.switch_attention
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "'flash_attention_2' takes no custom attention mask" in lines[0] and "'sdpa'" in lines[0]
    assert model.config._attn_implementation == "flash_attention_2"
    with trainer.step_context():
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "flash_attention_2"
    caplog.clear()
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with caplog.at_level(logging.INFO, logger="rcpo_losses.training.trainer"):
        padded = RCPOTrainer(model, args=args, processing_class=IntTokenizer(), layout="padded")
    assert padded.data_collator.layout == "padded" and not padded.switch_attention and not caplog.records
    with padded.step_context():
        assert model.config._attn_implementation == "flash_attention_2"  # layout="padded" keeps the user's kernel


def test_ignored_slots_are_zero_in_both_layouts():
    rows = random_rows()
    model = tiny_model("llama", dtype=torch.float64)
    for layout in ("padded", "prefix_shared"):
        batch = RankedPreferenceCollator(IntTokenizer(), layout=layout)(rows)
        batch["ranks"][1, 0] = IGNORE  # a real completion set aside
        with torch.no_grad():
            stats = response_stats(model, batch)
        for x in stats:
            assert (x[batch["ranks"] == IGNORE] == 0).all() and (x[batch["ranks"] != IGNORE] != 0).all()


def test_packed_batch_sizes():
    rows = random_rows()
    packed = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(rows)
    padded = RankedPreferenceCollator(IntTokenizer())(rows)
    prompt = sum(len(IntTokenizer()(r["prompt"])["input_ids"]) for r in rows)
    completion = int(padded["completion_mask"].sum())
    assert packed["input_ids"].numel() == prompt + completion  # no padding, prompts once
    assert packed["target_ids"].numel() == completion  # the LM head's rows
    with pytest.raises(ValueError, match="layout: expected one of"):
        RankedPreferenceCollator(IntTokenizer(), layout="packed")
    with pytest.raises(ValueError, match="row 0, completion 1 is empty"):
        pack_prefix_shared([[1, 2]], [[[3], []]], 2)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_fp64_norms_is_the_models_formula(family):
    batch = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(random_rows())
    model = tiny_model(family, "eager", torch.float64)
    with torch.no_grad():
        want = response_stats(model, batch).logps
        fp64_norms(model)
        got = response_stats(model, batch).logps
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, want)  # the patch did take effect


@pytest.mark.skipif(shutil.which("c++") is None, reason="FlexAttention on the CPU compiles C++ (inductor)")
def test_flex_attention_forward_on_cpu_equals_padded(monkeypatch):
    """The CUDA path, a BlockMask into FlexAttention, run forward on the CPU (FlexAttention's CPU backward is missing).

    Mistral: its sliding window in the one BlockMask. (One model: each compiles FlexAttention, tens of seconds.)
    """
    from torch.nn.attention.flex_attention import BlockMask

    rows = random_rows(0) + random_rows(1) + random_rows(2)  # P > 128: several blocks, some skipped
    padded = RankedPreferenceCollator(IntTokenizer())(rows)
    packed = RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(rows)
    model = tiny_model("mistral")
    # the probe's seven sequence lengths make inductor recompile FlexAttention's CPU template with dynamic shapes,
    # which fails to compile in torch 2.13 ("cur_qSplitSize9 was not declared"; static shapes compile). The CPU is
    # no flex target: RCPOTrainer steps a model with sdpa there
    monkeypatch.setattr(model_stats, "VERIFY", False)
    with torch.no_grad():
        want = response_stats(model, padded)
        model.set_attn_implementation("flex_attention")
        mask = prefix_shared_attention_mask(model, packed)
        assert isinstance(mask, BlockMask) and mask.sparsity() > 0
        got = response_stats(model, packed)
    torch.testing.assert_close(got.logps, want.logps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.entropy_sums, want.entropy_sums, rtol=1e-4, atol=1e-4)

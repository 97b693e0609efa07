"""The segment attention of the prefix-shared layout (rcpo_losses.training.segment_attention) against the dense mask.

The blocks must cover exactly the pairs of the one rule (packing.prefix_shared_mask_mod), and the
attention over them must give the dense-mask attention's values and gradients (fp64, GQA, windows,
chunks, per-layer types), eagerly and compiled, under activation checkpointing, in at most the dense
mask's memory. The model-level equality with the padded layout is
the zoo's (tests/test_prefix_shared_zoo.py), which runs this path for every ``sdpa`` family.
"""

from __future__ import annotations

import os
import shutil
import types

import pytest
import torch
import torch.nn.functional as F

from rcpo_losses.training.data import RankedPreferenceCollator
from rcpo_losses.training.packing import dense_attention_mask, pack_prefix_shared
from rcpo_losses.training.segment_attention import KWARG, Segments, segment_attention_forward, segment_bounds, segments
from tests import peak_memory
from tests.test_prefix_shared import WINDOW, IntTokenizer, fp64_softmax, random_rows  # noqa: F401 (a fixture)

LIMITS = {"full": (None, None), "sliding": (WINDOW, None), "chunked": (None, WINDOW)}


def packed_batch(seeds=(0, 1)):
    rows = [r for s in seeds for r in random_rows(s)]
    return RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(rows)


def covered(batch, layout: Segments, layer_type) -> torch.Tensor:
    """The ``(P, P)`` pairs the blocks attend, in packed positions."""
    P = batch["input_ids"].shape[-1]
    out = torch.zeros(P, P, dtype=torch.bool)
    start = 0
    for (n, sizes), (prompt, cross, own) in zip(layout.rows, layout.masks[layer_type], strict=True):
        p = torch.arange(start, start + n)
        out[p[:, None], p[None, :]] = torch.ones(n, n, dtype=torch.bool).tril() if prompt is None else prompt
        c = torch.arange(start + n, start + n + sum(sizes))
        out[c[:, None], p[None, :]] = True if cross is None else cross
        first = start + n
        for m, mask in zip(sizes, own, strict=True):
            j = torch.arange(first, first + m)
            out[j[:, None], j[None, :]] = torch.ones(m, m, dtype=torch.bool).tril() if mask is None else mask
            first += m
        start = first
    assert start == P
    return out


@pytest.mark.parametrize("seed", range(4))
def test_segments_cover_exactly_the_rules_pairs(seed):
    batch = packed_batch((seed, seed + 4))
    layout = segments(batch, LIMITS)
    assert sum(layout.sizes) == batch["input_ids"].shape[-1]  # contiguous, in order
    for name, (window, chunk) in LIMITS.items():
        want = dense_attention_mask(batch, sliding_window=window, chunk_size=chunk)[0, 0]
        assert torch.equal(covered(batch, layout, name), want), name


def test_segment_bounds():
    batch = pack_prefix_shared([[5, 6, 7], [8]], [[[1, 2], [3]], [[4, 4, 4]]], 2)
    # prompt 0, completion 0 (2 tokens), completion 1 (1 token), prompt 1, its completion (3 tokens)
    assert segment_bounds(batch) == ((0, 3, 0, 0), (3, 5, 0, 3), (5, 6, 0, 3), (6, 7, 6, 6), (7, 10, 6, 7))
    layout = segments(batch, {None: (None, None)})
    assert layout.sizes == (3, 3, 1, 3) and layout.rows == ((3, (2, 1)), (1, (3,)))
    batch["row_index"][0, 3] = 7  # a completion of a row with no prompt
    with pytest.raises(ValueError, match="row 7, completion 0 at position 3 has no prompt before it"):
        segment_bounds(batch)


def module(layer_type=None, training=False):
    """What the attention function reads from the attention module: its config's layer types and its layer index."""
    config = types.SimpleNamespace(layer_types=None if layer_type is None else ["full", layer_type])
    return types.SimpleNamespace(config=config, layer_idx=1, training=training)


def qkv(P, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, P, dim, generator=g, dtype=torch.float64) * 3
    k, v = (torch.randn(1, kv_heads, P, dim, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    return [x.requires_grad_() for x in (q, k, v)]


def dense_attention(batch, q, k, v, window, chunk, scale):
    mask = dense_attention_mask(batch, sliding_window=window, chunk_size=chunk)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # transformers' repeat_kv
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


CASES = [(t, "eager") for t in LIMITS] + [(t, "aot_eager") for t in LIMITS] + [("sliding", "inductor")]


@pytest.mark.parametrize(("layer_type", "compiled"), CASES, ids=[f"{t}-{c}" for t, c in CASES])
def test_equals_the_dense_mask_values_and_gradients(layer_type, compiled):
    """fp64, 4 query heads on 2 key/value heads (GQA), the layer type's window or chunk, a scale not 1/sqrt(d).

    ``compiled``: ``torch.compile(fullgraph=True)`` with that backend (aot_eager: dynamo's trace and AOT
    autograd without a C++ build; inductor once, it compiles for tens of seconds).
    """
    if compiled == "inductor" and shutil.which("c++") is None:
        pytest.skip("inductor on the CPU compiles C++")
    batch = packed_batch()
    layout = segments(batch, {"full": (None, None), layer_type: LIMITS[layer_type]})
    P = batch["input_ids"].shape[-1]
    fn = segment_attention_forward
    if compiled != "eager":
        fn = torch.compile(fn, fullgraph=True, backend=compiled)
    q, k, v = qkv(P)
    got, weights = fn(module(layer_type), q, k, v, None, scaling=0.3, **{KWARG: layout})
    assert weights is None and got.shape == (1, P, 4, 8)
    want = dense_attention(batch, q, k, v, *LIMITS[layer_type], scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got_grads = torch.autograd.grad(got, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer_type", list(LIMITS))
def test_one_call_per_row_equals_the_dense_mask(layer_type, monkeypatch):
    """The path of attention dropout (and of other devices): one ``sdpa`` call per row with the row's mask."""
    from rcpo_losses.training import segment_attention

    monkeypatch.setattr(segment_attention, "_blocks", lambda query, dropout: False)
    batch = packed_batch()
    layout = segments(batch, {"full": (None, None), layer_type: LIMITS[layer_type]})
    q, k, v = qkv(batch["input_ids"].shape[-1])
    got, _ = segment_attention_forward(module(layer_type), q, k, v, None, scaling=0.3, **{KWARG: layout})
    want = dense_attention(batch, q, k, v, *LIMITS[layer_type], scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    monkeypatch.undo()
    dropped, _ = segment_attention_forward(module(layer_type, training=True), q, k, v, None, dropout=0.5,
                                           **{KWARG: layout})  # fmt: skip
    assert dropped.shape == got.shape and not torch.equal(dropped, got)


def test_refuses_what_it_cannot_compute():
    batch = packed_batch()
    layout = segments(batch, {None: (None, None)})
    q, k, v = qkv(batch["input_ids"].shape[-1])
    with pytest.raises(ValueError, match="needs the packed batch's segments as the keyword argument 'rcpo_segments'"):
        segment_attention_forward(module(), q, k, v, None)
    for name in ("softcap", "s_aux"):
        with pytest.raises(ValueError, match=f"{name} is not supported"):
            segment_attention_forward(module(), q, k, v, None, **{KWARG: layout, name: torch.ones(4)})
    with pytest.raises(ValueError, match="takes no attention_mask"):
        segment_attention_forward(module(), q, k, v, dense_attention_mask(batch), **{KWARG: layout})


@pytest.mark.usefixtures("fp64_softmax")
def test_compiled_model_equals_padded():
    """``torch.compile(model)`` through ``response_stats``: Qwen3, GQA, a full and a sliding layer, fp64.

    aot_eager: dynamo traces the model's forward with the segments in its keyword arguments, up to the wrapped
    ``sdpa`` function, which runs the segment attention eagerly (a graph break; the inductor build of the
    function itself is the test above).
    """
    from rcpo_losses import response_stats
    from tests.test_prefix_shared import fp64_norms
    from tests.test_prefix_shared_zoo import zoo_model

    rows = random_rows()
    padded = RankedPreferenceCollator(IntTokenizer(), k=3)(rows)
    packed = RankedPreferenceCollator(IntTokenizer(), k=3, layout="prefix_shared")(rows)
    model = zoo_model("qwen3")
    fp64_norms(model)
    compiled = torch.compile(model, backend="aot_eager")
    results = []
    for m, batch in ((model, padded), (compiled, packed)):
        model.zero_grad(set_to_none=True)
        stats = response_stats(m, batch)
        (stats.logps.sum() + stats.entropy_sums.sum()).backward()
        results.append((stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got.logps, want.logps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.entropy_sums, want.entropy_sums, rtol=1e-9, atol=1e-9)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("how", ["transformers", "reentrant", "non_reentrant"])
def test_activation_checkpointing_recomputes_the_segments(how, monkeypatch):
    """However the layers are checkpointed, the backward recomputes them with the segments: the padded gradients.

    ``transformers``: ``gradient_checkpointing_enable()``; the others: PyTorch's ``checkpoint_wrapper`` on each
    decoder layer, as FSDP and accelerate's FSDP plugin apply it (``model.is_activation_checkpointing`` stays False).
    """
    from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as wrappers

    from rcpo_losses.training import model_stats
    from tests.test_prefix_shared import fp64_norms, stats_and_grads
    from tests.test_prefix_shared_zoo import zoo_model

    rows = random_rows()
    padded = RankedPreferenceCollator(IntTokenizer(), k=3)(rows)
    packed = RankedPreferenceCollator(IntTokenizer(), k=3, layout="prefix_shared")(rows)
    model = zoo_model("mistral")
    fp64_norms(model)
    model.train()  # no dropout in its config: the same numbers as eval
    if how == "transformers":
        model.gradient_checkpointing_enable()
    else:
        impl = wrappers.CheckpointImpl.REENTRANT if how == "reentrant" else wrappers.CheckpointImpl.NO_REENTRANT
        wrappers.apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=lambda m: wrappers.checkpoint_wrapper(m, checkpoint_impl=impl),
            check_fn=lambda m: type(m).__name__.endswith("DecoderLayer"),
        )
        assert not model.is_activation_checkpointing
    built = []
    segments = model_stats.segments
    monkeypatch.setattr(model_stats, "segments", lambda *args: built.append(1) or segments(*args))
    want, want_grads = stats_and_grads(model, padded, True)
    got, got_grads = stats_and_grads(model, packed, True)
    assert built  # the segment attention ran
    torch.testing.assert_close(got.logps, want.logps, rtol=1e-10, atol=1e-10)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-10, atol=1e-10, msg=name)


def test_compiled_model_keeps_a_bounded_number_of_graphs():
    """``torch.compile(model)`` over 14 batches of varied layouts: the segment attention runs eagerly between the
    model's graphs (a graph break each), whose packed length is dynamic; no graph per layout (each would be a
    recompile, until dynamo's limit sends the rest of the run back to eager)."""
    from torch._dynamo.testing import CompileCounter

    from rcpo_losses import response_stats
    from tests.test_prefix_shared_zoo import rows_of, zoo_model

    torch._dynamo.reset()
    model = zoo_model("llama", torch.float32, num_hidden_layers=1)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    g = torch.Generator().manual_seed(0)
    graphs = []
    for i in range(14):
        rows = []
        for r in range(1 + i % 3):
            lengths = torch.randint(0, 9, (int(torch.randint(2, 5, (), generator=g)),), generator=g).tolist()
            rows += rows_of(int(torch.randint(1, 9, (), generator=g)), lengths, seed=100 * i + r)
        with torch.no_grad():
            response_stats(compiled, RankedPreferenceCollator(IntTokenizer(), layout="prefix_shared")(rows))
        graphs.append(counter.frame_count)
    # the first batch compiles each piece with static shapes, the second with dynamic ones; then none
    assert graphs[1] == graphs[-1] <= 2 * graphs[0], graphs


MEMORY_SCRIPT = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
import segment_attention_memory as bench
print(json.dumps(bench.measure(sys.argv[2], sys.argv[3], start, peak, timed=False)))
"""


@pytest.mark.skipif(not peak_memory.SUPPORTED, reason="reads /proc and relies on glibc malloc")
def test_memory_at_most_the_dense_masks():
    """Issue 32's shape at half size: a 1,000-token prompt, 16 completions of about 20 tokens, 16 query heads on 2
    key/value heads, bf16, forward and backward (``benchmarks/segment_attention_memory.py``, shape ``issue_half``).

    The segments hold no copy of the prompt's keys per completion and repeat no key/value heads: their peak is at
    most the dense mask's (as transformers runs it: bool ``[P, P]`` mask, heads repeated)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dense, ours = (
        peak_memory.run(MEMORY_SCRIPT, root, path, "issue_half")["peak_bytes"] for path in ("dense", "segments")
    )
    assert ours <= dense, f"segments {ours / 1e6:.0f} MB, dense {dense / 1e6:.0f} MB"

"""prepare_reference_model on one process: FSDP2 sharding, the DDP placement, the DeepSpeed config.

accelerate 1.15 enables FSDP and DeepSpeed only on accelerators (on the CPU a Trainer with
``fsdp=`` silently runs DDP; see docs/integration.md), so the FSDP branch is tested here with
the accelerator's plugin on a 1-process gloo group, and the DeepSpeed branch with a stand-in
for ``deepspeed.initialize`` (DeepSpeed is not installed).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from ranked import frozen_copy, make_ranked_batch, tiny_llama  # noqa: E402

from rcpo_losses import response_stats  # noqa: E402
from rcpo_losses.training.reference_model import (  # noqa: E402
    deepspeed_reference_config,
    prepare_reference_model,
    release_reference,
)


def accelerator_with(fsdp_plugin=None, deepspeed_plugin=None):
    state = types.SimpleNamespace(fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin)
    return types.SimpleNamespace(state=state, device=torch.device("cpu"))


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore")
def test_fsdp2_reference_is_sharded_and_exact(one_process_group):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FSDPModule

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"]
    )
    model = tiny_llama(seed=0)
    want = frozen_copy(model)
    ref = prepare_reference_model(model, accelerator_with(fsdp_plugin=plugin))
    units = [name for name, m in ref.named_modules() if isinstance(m, FSDPModule)]
    assert units == ["", "model.layers.0", "model.layers.1"]  # one unit per decoder layer, and the root
    assert not ref.training and all(type(p).__name__ == "DTensor" and not p.requires_grad for p in ref.parameters())
    batch = make_ranked_batch(seed=1)
    with torch.no_grad():
        for fused in (False, True):
            got = response_stats(ref, batch, fused_linear=fused)
            release_reference(ref)
            assert type(ref.lm_head.weight).__name__ == "DTensor"  # back to its shard
            for g, w in zip(got, response_stats(want, batch, fused_linear=fused), strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_ddp_reference_is_placed_not_wrapped():
    acc = accelerate.Accelerator(cpu=True)
    model = tiny_llama(seed=0)
    ref = prepare_reference_model(model, acc)
    assert ref is model and not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert type(ref).__name__ == "LlamaForCausalLM"  # no DistributedDataParallel: no gradients to reduce
    release_reference(ref)  # nothing to do


@pytest.mark.parametrize("stage, want", [(2, 0), (3, 3), (1, 0)])
def test_deepspeed_reference_config_and_engine(monkeypatch, stage, want):
    config = {"zero_optimization": {"stage": stage}, "optimizer": {"type": "AdamW"}, "train_batch_size": 8}
    got = deepspeed_reference_config(config)
    assert got == {"zero_optimization": {"stage": want}, "train_batch_size": 8}
    assert config["zero_optimization"]["stage"] == stage and "optimizer" in config  # the policy's is untouched
    seen = {}

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    def initialize(model, config):
        seen["config"] = config
        return Engine(model), None, None, None

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(initialize=initialize))
    plugin = types.SimpleNamespace(deepspeed_config=config)
    model = tiny_llama(seed=0)
    engine = prepare_reference_model(model, accelerator_with(deepspeed_plugin=plugin))
    assert isinstance(engine, Engine) and engine.module is model and not engine.training
    assert seen["config"] == got and not any(p.requires_grad for p in model.parameters())

"""The reference model placed like the policy: sharded by the trainer's accelerator (DDP, FSDP, DeepSpeed), frozen.

As TRL does for its reference models: under DDP it is moved to the rank's device (it has no
gradients, so no DDP wrapper; each rank holds it once); under FSDP it is sharded with the
accelerator's FSDP plugin, as the policy is; under DeepSpeed it gets its own inference engine,
ZeRO-3 sharded when the policy is ZeRO-3, else unsharded (stage 0).
"""

from __future__ import annotations

import copy

from torch import nn

from .. import versions


def prepare_reference_model(model: nn.Module, accelerator) -> nn.Module:
    """``model`` frozen, in eval mode, and prepared by ``accelerator`` (an ``accelerate.Accelerator``) for inference.

    - DeepSpeed: ``deepspeed.initialize`` with the policy's config, ZeRO stage 3 kept and any
      other stage set to 0 (the reference has no optimizer state to partition).
    - FSDP (1 or 2): wrapped with the plugin's settings and auto-wrap policy, so each rank holds
      its shard and gathers one unit at a time in the forward.
    - otherwise: ``accelerator.prepare_model(model, evaluation_mode=True)``: on the device, under
      the accelerator's autocast, not wrapped in DDP.
    """
    model.eval().requires_grad_(False)
    state = accelerator.state
    if getattr(state, "deepspeed_plugin", None) is not None:
        return _prepare_deepspeed(model, state.deepspeed_plugin)
    if getattr(state, "fsdp_plugin", None) is not None:
        return _prepare_fsdp(model, accelerator)
    return accelerator.prepare_model(model, evaluation_mode=True)


def deepspeed_reference_config(config: dict) -> dict:
    """The policy's DeepSpeed config for the reference: ZeRO-3 kept (sharded), any other stage set to 0."""
    config = copy.deepcopy(config)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        zero["stage"] = 0
    for key in ("optimizer", "scheduler"):  # inference only
        config.pop(key, None)
    return config


def _prepare_deepspeed(model: nn.Module, plugin) -> nn.Module:
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=deepspeed_reference_config(plugin.deepspeed_config))
    engine.eval()
    return engine


def _prepare_fsdp(model: nn.Module, accelerator) -> nn.Module:
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, (FSDP, FSDPModule)):
        return model.eval()
    plugin = accelerator.state.fsdp_plugin
    plugin.set_auto_wrap_policy(model)
    if plugin.fsdp_version == 1:
        model = FSDP(
            model,
            sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
            cpu_offload=plugin.cpu_offload,
            auto_wrap_policy=plugin.auto_wrap_policy,
            mixed_precision=plugin.mixed_precision_policy,
            sync_module_states=plugin.sync_module_states,
            use_orig_params=plugin.use_orig_params,
            device_id=accelerator.device,
        )
        return model.eval()
    kwargs = {
        "reshard_after_forward": plugin.reshard_after_forward,
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
    }
    policy = plugin.auto_wrap_policy
    if policy is not None:  # one unit per decoder layer (the plugin's policy), then the root
        versions.require("accelerate")  # its fsdp2_prepare_auto_wrap_policy(plugin, model)
        from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

        wrap = fsdp2_prepare_auto_wrap_policy(plugin, model)
        for module in list(model.modules())[1:]:
            if wrap is not None and wrap(module) and not isinstance(module, FSDPModule):
                fully_shard(module, **kwargs)
    # The root (embeddings, final norm, LM head) stays gathered after the forward, as the policy's root
    # does until its backward, so that the fused path can read the head (lm_head_spec); with no backward
    # to reshard it, release_reference() reshards it after each use.
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    return model.eval()


def release_reference(model: nn.Module) -> None:
    """Reshard an FSDP2 reference's root after its forward (no-op for any other model)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()

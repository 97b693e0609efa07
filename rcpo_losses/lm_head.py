"""The LM head of a Hugging Face causal LM, as the fused linear path needs it, read from the model.

``lm_head_spec(model)`` returns the head's weight and bias and the output transform that the
model applies to its logits (Gemma-2's ``final_logit_softcapping``, Cohere's ``logit_scale``),
so that :func:`rcpo_losses.fused_linear_response_stats` computes the log-probs of the model's
own logits; ``final_hidden_states`` gets the hidden states those logits are computed from,
through the (possibly DDP-wrapped) model's own forward. Duck-typed: nothing here imports
``transformers``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn


class LMHeadSpec(NamedTuple):
    """What :func:`rcpo_losses.fused_linear_response_stats` needs to reproduce a model's logits."""

    weight: Tensor  # (V, H): model.get_output_embeddings().weight (tied to the embeddings in some models)
    bias: Tensor | None  # (V,) or None
    softcap: float | None  # config.final_logit_softcapping (Gemma-2: 30.0), or None
    logit_scale: float  # config.logit_scale (Cohere), or 1.0

    def as_kwargs(self) -> dict[str, Any]:
        """``dict(weight=..., bias=..., softcap=..., logit_scale=...)`` for ``fused_linear_*(hidden, **kwargs)``."""
        return self._asdict()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP's ``.module`` or ``torch.compile``'s ``._orig_mod`` wrappers."""
    while not hasattr(model, "get_output_embeddings"):
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(
                f"model: {type(model).__name__} has no get_output_embeddings() (expected a Hugging Face "
                "causal LM, possibly wrapped in DDP or torch.compile)"
            )
        model = inner
    return model


def _check_no_active_lora(head: nn.Module) -> None:
    """A LoRA adapter on the head makes its logits ``W x + B A x * scaling``: the spec's ``W`` alone would be wrong."""
    lora_a = getattr(head, "lora_A", None)
    if lora_a is None or getattr(head, "disable_adapters", False):
        return  # no adapter, or inside PEFT's disable_adapter(): the logits are the base layer's
    merged = set(getattr(head, "merged_adapters", []))
    active = [name for name in getattr(head, "active_adapters", []) if name in lora_a and name not in merged]
    if active:
        raise TypeError(
            f"model: the LM head carries the active, unmerged LoRA adapter(s) {active}, whose logits are "
            "W x + B A x * scaling; the fused path takes the base weight W only and does not compute the "
            "low-rank term. Leave lm_head out of the LoRA target_modules, merge the adapter, or use "
            "fused_linear=False"
        )


def lm_head_spec(model: nn.Module) -> LMHeadSpec:
    r"""The LM head's weight and bias, and the model's logit transform, read from a Hugging Face causal LM.

    The model's logits are :math:`c \tanh(a (h W^\top + b) / c)` with ``c`` =
    ``config.final_logit_softcapping`` (Gemma-2; no cap when it is None) and ``a`` =
    ``config.logit_scale`` (Cohere; 1 when absent). Passing the spec to the fused path
    (``fused_linear_response_stats(hidden, labels=..., **spec.as_kwargs())``) gives the
    log-probs of exactly those logits, so the transform cannot be forgotten.

    Args:
        model: a causal LM with ``get_output_embeddings()`` and ``config``, or a DDP /
            ``torch.compile`` wrapper of one (unwrapped through ``.module`` / ``._orig_mod``).

    Returns:
        :class:`LMHeadSpec` ``(weight, bias, softcap, logit_scale)``; the tensors are the
        model's own parameters (gradients reach them). Under FSDP2 (``fully_shard``) call it
        after :func:`final_hidden_states`: the forward has then gathered the root module's
        head (a sharded DTensor before it raises a ``TypeError``). A PEFT LoRA adapter on the
        head (logits ``W x + B A x * scaling``) raises a ``TypeError`` unless it is merged or
        disabled (``model.disable_adapter()``): the spec holds ``W`` alone.
    """
    inner = unwrap_model(model)
    head = inner.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise TypeError(f"model: {type(inner).__name__}.get_output_embeddings() has no weight tensor")
    _check_no_active_lora(head)
    if type(head.weight).__name__ == "DTensor" or hasattr(head.weight, "full_tensor"):
        raise TypeError(
            "model: the LM head's weight is a sharded DTensor (FSDP2 between forwards). Call lm_head_spec after "
            "the model's forward (final_hidden_states), which unshards it: FSDP2 keeps the root module's "
            "parameters unsharded until the backward, and reduce-scatters their gradients"
        )
    config = getattr(inner, "config", None)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):  # multimodal configs keep the language model's settings in a sub-config
        config = get_text()
    softcap = getattr(config, "final_logit_softcapping", None)
    logit_scale = getattr(config, "logit_scale", None)
    bias = getattr(head, "bias", None)
    return LMHeadSpec(
        head.weight,
        bias if isinstance(bias, Tensor) else None,
        None if softcap is None else float(softcap),
        1.0 if logit_scale is None else float(logit_scale),
    )


def final_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
    """The hidden states the LM head reads (after the final norm), through the model's own forward.

    Calls ``model(input_ids, attention_mask=..., output_hidden_states=True, logits_to_keep=1,
    use_cache=False)`` and returns ``hidden_states[-1]``: the model (or its DDP wrapper) runs
    its usual forward, so DDP's hooks and FSDP's parameter gathering happen as in training,
    while the head forms the logits of one position only. (Calling ``model.get_decoder()`` on
    a DDP wrapper would bypass DDP.) For Llama, Mistral and Gemma-2 in transformers 5.x,
    ``hidden_states[-1]`` is the output of the final norm, which ``model(...).logits`` is
    computed from.

    Shape:
        - input_ids, attention_mask: ``(B, T)``; output: ``(B, T, H)``.
    """
    out = model(
        input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
        **kwargs,
    )
    hidden = getattr(out, "hidden_states", None)
    if not hidden:
        raise TypeError(f"model: {type(unwrap_model(model)).__name__} returned no hidden_states")
    return hidden[-1]

"""The LM head of a Hugging Face causal LM, as the fused linear path needs it, read from the model.

``lm_head_spec(model)`` returns the head's weight and bias and the output transform that the
model applies to its logits (Gemma-2's ``final_logit_softcapping``, Cohere's ``logit_scale``,
Granite's ``logits_scaling``, Falcon-H1's ``lm_head_multiplier``), so that
:func:`rcpo_losses.fused_linear_response_stats` computes the log-probs of the model's own
logits; ``final_hidden_states`` gets the hidden states those logits are computed from,
through the (possibly DDP-wrapped) model's own forward. Duck-typed: nothing here imports
``transformers``.

A table of config fields lags the model zoo, so the first time a (model class, head class,
the head's adapter state, config) is seen, the spec is checked against the model's own
``model(...).logits`` on a few positions (:func:`check_lm_head_spec`, one small forward);
``VERIFY = False`` here, or ``lm_head_spec(model, verify=False)``, turns that off.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..reference.token_stats import LogitTransform

# The first-seen check of lm_head_spec against model(...).logits: on by default (see check_lm_head_spec).
VERIFY = True
_VERIFIED: set[tuple] = set()  # (model class, head class, adapter state, config fingerprint) checked

# Config fields that scale the logits, with the power of the field that multiplies them, as the
# models' forwards in transformers 5.x apply them: {field: {model_type: power, "*": other types}}.
# Power 0: the config carries the field but the forward never applies it.
SCALE_FIELDS = {
    "logit_scale": {"*": 1, "mpt": 0},  # Cohere, Cohere2: logits * logit_scale; MPT's forward ignores its own
    "logits_scaling": {"*": -1, "hyperclovax": 1},  # Granite, GraniteMoe*: logits / logits_scaling
    "lm_head_multiplier": {"*": 1},  # Falcon-H1: lm_head(h) * lm_head_multiplier
    "output_multiplier": {"*": 1},  # Muse: logits * output_multiplier, before the soft-cap
}


class LMHeadSpec(NamedTuple):
    """What :func:`rcpo_losses.fused_linear_response_stats` needs to reproduce a model's logits."""

    weight: Tensor  # (V, H): model.get_output_embeddings().weight (tied to the embeddings in some models)
    bias: Tensor | None  # (V,) or None
    softcap: float | None  # config.final_logit_softcapping (Gemma-2: 30.0), or None
    logit_scale: float  # product of SCALE_FIELDS' factors (Cohere's logit_scale, 1 / Granite's logits_scaling)

    def as_kwargs(self) -> dict[str, Any]:
        """``dict(weight=..., bias=..., softcap=..., logit_scale=...)`` for ``fused_linear_*(hidden, **kwargs)``."""
        return self._asdict()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP's ``.module`` or ``torch.compile``'s ``._orig_mod`` wrappers."""
    # torch.compile's wrapper forwards attribute reads (get_output_embeddings too) but not its class's forward
    while not hasattr(model, "get_output_embeddings") or isinstance(getattr(model, "_orig_mod", None), nn.Module):
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


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout) inside the block; every module's own train/eval flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model.eval()
    finally:
        for m, training in modes:
            m.training = training


# How PEFT's tuner modules (peft.tuners.<tuner>) spell their adapter type, for the error message.
_TUNER_NAMES = {
    "lora": "LoRA",
    "loha": "LoHa",
    "lokr": "LoKr",
    "ia3": "IA3",
    "oft": "OFT",
    "boft": "BOFT",
    "vera": "VeRA",
}


def _check_no_active_adapter(head: nn.Module) -> None:
    """A PEFT adapter on the head (LoRA, LoHa, IA3, ...) changes its logits: the spec's ``W`` alone would be wrong."""
    if not hasattr(head, "base_layer") or getattr(head, "disable_adapters", False):
        return  # no tuner layer (a ModulesToSaveWrapper's weight is its active copy's), or inside disable_adapter()
    present = set()
    for name in getattr(head, "adapter_layer_names", ()):
        present |= set(getattr(head, name, None) or ())
    merged = set(getattr(head, "merged_adapters", []))
    active = [name for name in getattr(head, "active_adapters", []) if name in present and name not in merged]
    if active:
        module = type(head).__module__.split(".")
        tuner = module[2] if module[:2] == ["peft", "tuners"] and len(module) > 2 else type(head).__name__
        kind = _TUNER_NAMES.get(tuner, tuner)
        logits = "W x + B A x * scaling" if tuner == "lora" else "not those of its base weight W"
        raise TypeError(
            f"model: the LM head carries the active, unmerged {kind} adapter(s) {active} "
            f"({type(head).__module__}.{type(head).__name__}), whose logits are {logits}; the fused path takes "
            f"the base weight W only and does not compute the adapter. Leave lm_head out of the {kind} "
            "target_modules, merge the adapter, or use fused_linear=False"
        )


def _adapter_state(head: nn.Module) -> tuple:
    """What of a PEFT-wrapped head changes its output: adapters on or off, active and merged ones."""
    return tuple(repr(getattr(head, name, None)) for name in ("disable_adapters", "active_adapters", "merged_adapters"))


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):  # multimodal configs keep the language model's settings in a sub-config
        config = get_text()
    return config


def _logit_scale(config, name: str) -> float:
    """The product of the :data:`SCALE_FIELDS` factors that ``config``'s model type applies."""
    scale = 1.0
    model_type = getattr(config, "model_type", None)
    for field, powers in SCALE_FIELDS.items():
        value = getattr(config, field, None)
        power = powers.get(model_type, powers["*"])
        if value is None or power == 0:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"model: {name}.config.{field} = {value!r} is not a finite number > 0")
        scale *= float(value) ** power
    return scale


def lm_head_spec(model: nn.Module, *, verify: bool | None = None) -> LMHeadSpec:
    r"""The LM head's weight and bias, and the model's logit transform, read from a Hugging Face causal LM.

    The model's logits are :math:`c \tanh(a (h W^\top + b) / c)` with ``c`` =
    ``config.final_logit_softcapping`` (Gemma-2; no cap when it is None) and ``a`` the product
    of the scales in :data:`SCALE_FIELDS`: Cohere's ``logit_scale``, ``1 / logits_scaling``
    (Granite, GraniteMoe), Falcon-H1's ``lm_head_multiplier`` (1 when absent; MPT's config
    has a ``logit_scale`` that its forward never applies, so it is not read). Passing the spec
    to the fused path (``fused_linear_response_stats(hidden, labels=..., **spec.as_kwargs())``)
    gives the log-probs of exactly those logits, so the transform cannot be forgotten.

    A transform that no config field tells (a custom head, a family newer than the table) is
    caught by :func:`check_lm_head_spec`: the first time a (model class, head class, the
    head's PEFT adapter state, config) is seen in the process, the spec's logits are compared
    with ``model(...).logits`` on a few positions (one small forward, in eval mode, under
    ``no_grad``, under the autocast the forward runs under; skipped while ``torch.compile``
    traces), and a ``ValueError`` names the model class if they differ.

    Args:
        model: a causal LM with ``get_output_embeddings()`` and ``config``, or a DDP /
            ``torch.compile`` wrapper of one (unwrapped through ``.module`` / ``._orig_mod``).
        verify: run the first-seen check; ``None`` (default) follows the module switch
            ``rcpo_losses.tokens.lm_head.VERIFY`` (True). ``False`` for models whose forward cannot
            be called with ``input_ids`` alone, or under FSDP when ranks may see different models.

    Returns:
        :class:`LMHeadSpec` ``(weight, bias, softcap, logit_scale)``; the tensors are the
        model's own parameters (gradients reach them). Under FSDP2 (``fully_shard``) call it
        after :func:`final_hidden_states`: the forward has then gathered the root module's
        head (a sharded DTensor before it raises a ``TypeError``). A PEFT adapter of any type
        on the head (LoRA: logits ``W x + B A x * scaling``; LoHa, LoKr, IA3, OFT, ...) raises
        a ``TypeError`` naming it unless it is merged or disabled (``model.disable_adapter()``):
        the spec holds ``W`` alone. (``modules_to_save=["lm_head"]`` is exact: its weight is
        the trained copy's.)
    """
    inner = unwrap_model(model)
    spec = _read_spec(inner)
    if (VERIFY if verify is None else verify) and not torch.compiler.is_compiling():
        key = _fingerprint(inner)
        if key not in _VERIFIED:
            check_lm_head_spec(inner, spec)
            _VERIFIED.add(key)
            spec = _read_spec(inner)  # the forward may have re-gathered (FSDP) the head's parameters
    return spec


def _read_spec(inner: nn.Module) -> LMHeadSpec:
    head = inner.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise TypeError(f"model: {type(inner).__name__}.get_output_embeddings() has no weight tensor")
    _check_no_active_adapter(head)
    if type(head.weight).__name__ == "DTensor" or hasattr(head.weight, "full_tensor"):
        raise TypeError(
            "model: the LM head's weight is a sharded DTensor (FSDP2 between forwards). Call lm_head_spec after "
            "the model's forward (final_hidden_states), which unshards it: FSDP2 keeps the root module's "
            "parameters unsharded until the backward, and reduce-scatters their gradients"
        )
    config = _config(inner)
    softcap = getattr(config, "final_logit_softcapping", None)
    bias = getattr(head, "bias", None)
    return LMHeadSpec(
        head.weight,
        bias if isinstance(bias, Tensor) else None,
        None if softcap is None else float(softcap),
        _logit_scale(config, type(inner).__name__),
    )


def config_key(config, *, attention: bool = False) -> str:
    """The repr of a config's fields, the key of a first-seen check (a config changed in place is a new key).

    Left out: special token ids (Trainer rewrites them at the first step to match the tokenizer)
    and, unless ``attention``, the attention implementation (``set_attn_implementation``), which
    changes no logit transform. (A repr takes about 30 us for a Llama config; ``to_json_string`` 200 us.)
    """
    if not hasattr(config, "__dict__"):
        return repr(config)

    def kept(field: str) -> bool:
        return not field.endswith(("_token_id", "_token_ids")) and (
            attention or not field.startswith("_attn_implementation")
        )

    return repr(sorted((k, v) for k, v in vars(config).items() if kept(k)))


def _fingerprint(inner: nn.Module) -> tuple:
    """``(model class, head class, the head's adapter state, the config's fields)``: the key of a model checked."""
    fields = config_key(getattr(inner, "config", None))
    head = inner.get_output_embeddings()
    return type(inner), type(head), _adapter_state(head), fields


# Largest max|spec logits - model logits| / max|model logits| accepted: rounding of the model's own
# logits (bf16/fp16 products, TF32 matmuls in fp32) against the spec's fp32 (fp64) recomputation.
# Also the tolerance of the prefix-shared layout's first-seen probe (rcpo_losses.training.model_stats).
TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-3}
HALF_TOLERANCE = 4e-2


def check_tolerance(dtypes: set[torch.dtype], half: bool) -> float:
    """The relative tolerance of a first-seen check whose tensors have ``dtypes`` (``half``: under autocast)."""
    if half or dtypes & {torch.bfloat16, torch.float16}:
        return HALF_TOLERANCE
    return max(TOLERANCE.get(d, HALF_TOLERANCE) for d in dtypes)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts matmuls to on ``device``'s type right now, or None when it is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def check_lm_head_spec(model: nn.Module, spec: LMHeadSpec | None = None, *, positions: int = 4) -> None:
    r"""Raise ``ValueError`` unless ``spec`` reproduces ``model(...).logits`` on ``positions`` tokens.

    Runs ``model(ids, output_hidden_states=True, use_cache=False)`` on one sequence of
    ``positions`` fixed token ids (no random numbers drawn), in eval mode and under
    ``torch.no_grad()`` (every module's train/eval flag is restored after), and compares
    :math:`c \tanh(a (h W^\top + b) / c)`, from ``spec`` and ``hidden_states[-1]``, with the
    logits: :math:`\max |z_{spec} - z| \le \epsilon \max |z|`, ``eps = 1e-6`` in fp64,
    ``2e-3`` in fp32 (TF32 products), ``4e-2`` for bf16/fp16 or under autocast. Like with like: the
    product :math:`h W^\top + b` is recomputed under the autocast the head ran under, as a hook on
    the head sees it inside the forward (accelerate, for ``Trainer``'s ``bf16=True`` / ``fp16=True``,
    wraps ``model.forward`` in autocast and casts its outputs back to fp32). A mismatch means
    the forward transforms the logits in a way the spec does not know, or ``hidden_states[-1]``
    is not what its head reads. ``lm_head_spec`` calls it once per (model class, head class, adapter state, config).
    """
    inner = unwrap_model(model)
    spec = _read_spec(inner) if spec is None else spec
    name = f"{type(inner).__name__}(lm_head={type(inner.get_output_embeddings()).__name__})"
    embeddings = getattr(inner, "get_input_embeddings", lambda: None)()
    device = getattr(embeddings, "weight", spec.weight).device
    V = spec.weight.shape[0]
    ids = torch.linspace(1, V - 1, positions, device=device).long()[None]
    # The autocast the head runs under, seen from inside the forward: accelerate (Trainer's bf16=True / fp16=True)
    # wraps model.forward in autocast and casts the outputs back to fp32, so none shows from out here.
    seen: list[torch.dtype | None] = []
    hook = inner.get_output_embeddings().register_forward_pre_hook(lambda *_: seen.append(_autocast_dtype(device)))
    try:
        with torch.no_grad(), eval_mode(inner):
            try:
                out = inner(
                    input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False
                )
            except TypeError as e:
                raise TypeError(
                    f"model: {name} cannot be called as model(input_ids=..., attention_mask=..., "
                    f"output_hidden_states=True, use_cache=False) to check lm_head_spec against its logits ({e}); "
                    "pass verify=False"
                ) from e
            spec = _read_spec(inner)  # FSDP: the head as this forward gathered it
            hidden = getattr(out, "hidden_states", None)
            if not hidden:
                raise TypeError(f"model: {name} returned no hidden_states")
            want = out.logits.double()
            amp = seen[-1] if seen else _autocast_dtype(device)
            # Like with like: the head's product under the autocast the model's head ran under, the transform in fp64.
            if amp is None:
                h = hidden[-1].to(want.dtype)
                z = nn.functional.linear(
                    h, spec.weight.to(h.dtype), None if spec.bias is None else spec.bias.to(h.dtype)
                )
            else:
                with torch.autocast(device.type, dtype=amp):
                    z = nn.functional.linear(hidden[-1], spec.weight, spec.bias).double()
            transform = LogitTransform.make(spec.softcap, spec.logit_scale, 1.0)
            got = z if transform is None else transform.reference(z)
    finally:
        hook.remove()
    dtypes = {out.logits.dtype, hidden[-1].dtype, spec.weight.dtype}
    eps = check_tolerance(dtypes, amp is not None)
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    if not err <= eps * scale:
        raise ValueError(
            f"model: {name}'s own logits differ from lm_head_spec's (softcap={spec.softcap}, "
            f"logit_scale={spec.logit_scale:.6g}): max |difference| {err:.3g} against max |logit| {scale:.3g} "
            f"on {positions} positions. Its forward transforms the logits in a way rcpo_losses does not know "
            "(or hidden_states[-1] is not what its head reads). Take the log-probs from model(...).logits "
            "(response_token_stats), or pass the right softcap / logit_scale to the fused functions yourself "
            "and call lm_head_spec(model, verify=False)"
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

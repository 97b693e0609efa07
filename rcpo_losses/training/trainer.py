"""``RCPOTrainer``: a ``transformers.Trainer`` that trains a causal LM on ranked completions.

::

    from rcpo_losses.training.trainer import RCPOTrainer

    trainer = RCPOTrainer(model, args=TrainingArguments("out"), train_dataset=rows,
                          processing_class=tokenizer, loss="mallows_rmj_topk", beta=0.1, k=2)
    trainer.train()

Rows as :class:`rcpo_losses.training.data.RankedPreferenceCollator` reads them. See docs/integration.md.
"""

from __future__ import annotations

# ruff: noqa: E402
import contextlib
import copy
import logging
import math
from collections import defaultdict

import torch
from torch import Tensor

from .. import versions

# Before transformers is imported: an older transformers, accelerate or peft (which transformers' trainer
# imports when it is installed) raises ImportError naming both versions, not an error from deep inside.
versions.require("transformers")
versions.require("accelerate")
versions.require("peft")

from transformers import Trainer

from .. import nn as rcpo_nn
from ..dispersion import entropy_dispersion
from ..metrics import ranking_metrics
from ..mnl import mnl_topk
from ..ranks import IGNORE, UNRANKED, all_pairs, in_assortment, valid_rows
from ..tokens.lm_head import eval_mode
from ..tokens.stats import ResponseTokenStats
from .data import PRECOMPUTED_COLUMNS, REF_COLUMNS, ROW_COLUMNS, RankedPreferenceCollator
from .model_stats import (
    attention_implementation,
    mask_attention_implementation,
    prefix_shared_problem,
    response_stats,
)
from .precompute import (
    has_reference_stats,
    is_stream,
    precompute_reference_stats,
    rows_without_reference_stats,
    with_reference_columns,
)
from .reference_model import prepare_reference_model, release_reference

logger = logging.getLogger(__name__)

LISTWISE = {
    "mnl_discrete": rcpo_nn.MNLDiscreteLoss,
    "mnl_topk": rcpo_nn.MNLTopKLoss,
    "mallows_rmj_discrete": rcpo_nn.MallowsRMJDiscreteLoss,
    "mallows_rmj_topk": rcpo_nn.MallowsRMJTopKLoss,
}
PAIRWISE = {"mnl_pairwise": rcpo_nn.MNLPairwiseLoss, "mallows_rmj_pairwise": rcpo_nn.MallowsRMJPairwiseLoss}
LOSSES = (*LISTWISE, *PAIRWISE, "dpo_all_pairs")
METRIC_NAMES = ("rewards/kendall_tau", "rewards/top1_accuracy", "rewards/margins", "dispersion/neg_log_phi")


def is_peft_model(model) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (whose base, adapters disabled, can be the reference)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def top_bottom_ranks(ranks: Tensor) -> Tensor:
    """Pairwise ranks of the best and the worst response of each row: 0, ``UNRANKED``, ``IGNORE`` elsewhere.

    The worst is the last of the list, or the one unranked response; a row with two or more
    unranked responses has no worst one (choosing one would order them by position), so it
    raises ``ValueError`` naming the row.
    """
    unranked = (ranks == UNRANKED).sum(-1)
    if (unranked > 1).any():
        b = int((unranked > 1).nonzero()[0, 0])
        raise ValueError(
            f"ranks[{b}]: a pairwise loss compares the best and the worst response, but {int(unranked[b])} "
            "responses are unranked (a top-k list); use k=None with scores, or a top-k loss"
        )
    S = ranks.shape[-1]
    key = torch.where(ranks == UNRANKED, S, torch.where(ranks >= 0, ranks, -1))
    worst = key.argmax(-1, keepdim=True)
    slots = torch.arange(S, device=ranks.device)
    return torch.where(ranks == 0, 0, torch.where(slots == worst, UNRANKED, IGNORE))


def kendall_tau(rewards: Tensor, ranks: Tensor, *, reduction: str = "mean") -> Tensor:
    """Kendall tau of the rewards with the observed lists: mean over rows of the mean ``sign(r_w - r_l)``.

    The pairs are those the top-k list implies (:func:`rcpo_losses.all_pairs`); tied rewards count 0.
    ``reduction="none"``: each row's value ``[B]`` (0 for a row with no pair), not their mean.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")
    pairs = all_pairs(ranks)
    r = torch.where(in_assortment(ranks), rewards.detach().float(), 0.0)[pairs.row]
    winner = (pairs.ranks == 0).int().argmax(-1, keepdim=True)
    loser = (pairs.ranks == UNRANKED).int().argmax(-1, keepdim=True)
    sign = torch.sign(r.gather(-1, winner) - r.gather(-1, loser))[:, 0]
    B = ranks.shape[0]
    total = torch.zeros(B, device=r.device).index_add_(0, pairs.row, sign)
    count = torch.zeros(B, device=r.device).index_add_(0, pairs.row, torch.ones_like(sign))
    if reduction == "none":
        return total / count.clamp(min=1)
    rows = count > 0
    return (total[rows] / count[rows]).mean() if rows.any() else torch.zeros((), device=r.device)


def named_datasets(train_dataset, eval_dataset) -> list[tuple[str, object]]:
    """``(argument, rows)`` of each dataset given: ``train_dataset``, ``eval_dataset`` or each ``eval_dataset[key]``."""
    named = [("train_dataset", train_dataset)]
    if isinstance(eval_dataset, dict):
        named += [(f"eval_dataset[{key!r}]", rows) for key, rows in eval_dataset.items()]
    else:
        named.append(("eval_dataset", eval_dataset))
    return [(name, rows) for name, rows in named if rows is not None]


def check_collator_options(data_collator, given: dict, args) -> None:
    """Refuse collator options given to the trainer that a user's ``data_collator`` would not apply.

    ``given``: the options passed explicitly (``k``, ``ties``, ``max_length``,
    ``max_prompt_length``); each must equal the collator's attribute of the same name. Those read
    from ``args`` (a TRL ``DPOConfig``) that differ are not applied: one logged warning.
    """
    missing = object()
    conflicts = [name for name, value in given.items() if getattr(data_collator, name, missing) != value]
    if conflicts:
        theirs = ", ".join(f"{name}={getattr(data_collator, name, '(none)')!r}" for name in conflicts)
        raise ValueError(
            f"{', '.join(conflicts)}: options of the collator RCPOTrainer builds, but data_collator="
            f"{type(data_collator).__name__} is given, whose own settings ({theirs}) would apply instead; set them on "
            "the collator (RankedPreferenceCollator(tokenizer, k=..., ties=..., max_length=..., "
            "max_prompt_length=...)) or leave them out here"
        )
    ignored = [
        name
        for name in ("max_length", "max_prompt_length")
        if name not in given
        and getattr(args, name, None) is not None
        and getattr(data_collator, name, missing) != getattr(args, name)
    ]
    if ignored:
        logger.warning(
            "RCPOTrainer: args.%s not applied: data_collator=%s does its own truncation",
            " and args.".join(ignored), type(data_collator).__name__,
        )  # fmt: skip


class RCPOTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is an RCPO objective on ranked completions.

    Each batch comes from :class:`~rcpo_losses.training.data.RankedPreferenceCollator` (built from
    ``processing_class``, ``max_length``, ``max_prompt_length``, ``k`` and ``ties``). The
    ``B x S`` completions run through the policy once each (and through the reference model
    under ``no_grad``); padding slots are never run. Their summed completion log-probs give
    the rewards ``r = beta * (log pi - log pi_ref)`` (eq. 2), the reference model's entropies
    the Mallows dispersion ``-log phi(x)`` (appendix D, :func:`~rcpo_losses.entropy_dispersion`).

    Args:
        model: the policy, a causal LM.
        ref_model: the reference model; ``None``: a frozen copy of ``model`` made here, before
            training, or for a PEFT model the model with its adapters disabled
            (``model.disable_adapter()``, no copy); not ``model`` itself (refused: it would
            freeze the policy). Every route runs the reference in eval mode (no dropout; the
            policy's train/eval flags are restored after). Pass it explicitly when resuming from a
            checkpoint. It is prepared by the trainer's accelerator as the policy is (sharded
            under FSDP and DeepSpeed ZeRO-3, :func:`prepare_reference_model`), in eval mode.
        args: ``TrainingArguments``. A TRL ``DPOConfig`` (or any arguments with ``beta``,
            ``max_length``, ``max_prompt_length`` fields) works too: those fields are used when
            the matching argument here is ``None``.
        train_dataset, eval_dataset: rows ``{"prompt", "completions", "scores" | "ranking"}``.
        processing_class: the tokenizer.
        loss: ``"mnl_topk"``, ``"mnl_discrete"``, ``"mnl_pairwise"``, ``"mallows_rmj_topk"``
            (default), ``"mallows_rmj_discrete"``, ``"mallows_rmj_pairwise"``, or
            ``"dpo_all_pairs"`` (DPO on every pair the list implies, the paper's baseline).
            Discrete losses use each list's first pick; pairwise losses its best and worst
            response (the row must be fully ranked, or have one unranked response).
        beta: KL strength of eq. 2 (default 0.1).
        k: longest top-k list kept from each row (``None``: all that the feedback orders).
        fused_linear: compute log-probs and entropies from the final hidden states and the
            LM head (:func:`~rcpo_losses.fused_linear_response_stats`), with the model's logit
            transform (:func:`~rcpo_losses.lm_head_spec`: Gemma-2's soft-capping, Granite's
            and Falcon-H1's logit scales; checked against ``model(...).logits`` the first time a
            model is seen): the ``[N, L, V]`` logits are never formed.
        max_length, max_prompt_length, ties: passed to the collator. With a ``data_collator`` of
            the user's, which does its own truncation and ranking, giving one of these and ``k``
            raises ``ValueError`` naming it unless the collator has the same value (``k=2`` with a
            collator that keeps every pick would otherwise train on other lists than asked, with
            no sign); ``args``' ``max_length`` and ``max_prompt_length`` (TRL's ``DPOConfig``
            always has them) that the collator does not share are not applied, with one logged
            warning.
        precompute_ref: run the reference once over ``train_dataset`` and ``eval_dataset``
            before training (:func:`~rcpo_losses.precompute_reference_stats`, batches of
            ``args.per_device_eval_batch_size``, through :meth:`response_stats` and under the
            autocast of training, ``bf16`` / ``fp16``) and keep no reference model. Rows that
            already carry the ``ref_logps``, ``ref_entropy_sums``, ``ref_lengths`` and
            ``ref_token_hash`` columns keep them; only the others are computed. Needs map-style
            datasets (a ``datasets.Dataset`` or a list of rows): a streamed ``IterableDataset`` that
            lacks the columns is refused (``ValueError`` naming the argument). Without it, datasets
            whose rows all carry the columns need no reference model either (a dict of eval
            datasets: each of them), and a dataset that carries them in some rows only gets the
            others computed here (with the reference, kept if another dataset has none).
        layout: the collator's layout: ``"prefix_shared"`` (default: each prompt computed once,
            no padding, the LM head on completion tokens only) or ``"padded"``. With
            ``"prefix_shared"``, a model whose attention implementation takes no custom mask
            (``flash_attention_2``, ``flash_attention_3``) runs the trainer's steps with
            ``flex_attention`` on CUDA or ``sdpa`` on the CPU (one logged line; its config keeps
            its own between steps); a model the layout cannot serve
            (:func:`rcpo_losses.training.model_stats.prefix_shared_problem`: refused by name, or its
            first-seen probe differs from the padded layout) falls back to ``"padded"`` with one
            logged warning. ``"padded"`` keeps the model's own kernel.
        **kwargs: the other ``Trainer`` arguments (``callbacks``, ``optimizers``, ...).

    Logs ``loss``, ``rewards/kendall_tau``, ``rewards/top1_accuracy``, ``rewards/margins``
    (reward of the pick minus the mean of the others) and ``dispersion/neg_log_phi``,
    averaged over the steps since the last log; ``evaluate()`` reports the same, and the loss, as
    means over its own rows (each row counted once whatever the batch size; under data parallelism
    the rows repeated to even out the processes are dropped; ``dpo_all_pairs``' loss: the mean over
    the pairs), under its ``metric_key_prefix`` (``eval_``, ``eval_<name>_`` for a dict of datasets,
    ``test_`` in ``predict()``'s metrics).
    """

    # compute_loss returns a per-batch mean (listwise and pairwise losses: rows weighted alike
    # within each micro-batch), or for dpo_all_pairs a sum over pairs / num_items_in_batch, which
    # is scaled for gradient accumulation already (set per instance in __init__).
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model=None,
        ref_model=None,
        args=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        loss: str = "mallows_rmj_topk",
        beta: float | None = None,
        k: int | None = None,
        fused_linear: bool = False,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        ties: str = "leave_out",
        precompute_ref: bool = False,
        layout: str = "prefix_shared",
        data_collator=None,
        **kwargs,
    ):
        if loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
        if model is None:
            raise ValueError("model: RCPOTrainer needs the policy model")
        if ref_model is not None and ref_model is model:
            raise ValueError(
                "ref_model: is the policy model itself, which would freeze it. Pass ref_model=None (a frozen copy "
                "of model is made; the base with its adapters disabled for a PEFT model), or a copy of model"
            )
        beta = getattr(args, "beta", 0.1) if beta is None else beta
        if data_collator is not None:
            given = {"k": k, "max_length": max_length, "max_prompt_length": max_prompt_length}
            given = {name: value for name, value in given.items() if value is not None}
            if ties != "leave_out":  # the default
                given["ties"] = ties
            check_collator_options(data_collator, given, args)
        max_length = getattr(args, "max_length", None) if max_length is None else max_length
        max_prompt_length = getattr(args, "max_prompt_length", None) if max_prompt_length is None else max_prompt_length
        choose_layout = data_collator is None and layout == "prefix_shared"  # the collator is ours
        if data_collator is None:
            if processing_class is None:
                raise ValueError("processing_class: the tokenizer is needed to build the collator")
            data_collator = RankedPreferenceCollator(
                processing_class,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                k=k,
                ties=ties,
                layout=layout,
            )
        self.loss_name = loss
        self.loss_is_scaled_for_ga = loss == "dpo_all_pairs"
        self.beta = beta
        self.fused_linear = fused_linear
        module = LISTWISE.get(loss) or PAIRWISE.get(loss) or rcpo_nn.MNLTopKLoss  # dpo_all_pairs: MNL on pairs
        self.loss_fn = module(beta=beta)
        self._row_loss_fn = module(beta=beta, reduction="none")  # evaluation: each row's loss
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        # The rows whose reference statistics are computed here: every row that lacks them with
        # precompute_ref, else those of a dataset that carries them in some rows only. Without
        # precompute_ref, a dataset that carries none keeps a live reference model.
        self._rows_to_precompute: dict[str, list[int]] = {}
        named = named_datasets(train_dataset, eval_dataset)
        live = not named
        for name, rows in named:
            if is_stream(rows):
                if has_reference_stats(rows):  # its rows are checked as they are collated
                    continue
                if precompute_ref:
                    raise ValueError(
                        f"{name}: precompute_ref=True adds the reference's statistics to the rows of a map-style "
                        f"dataset (a datasets.Dataset or a list of rows), got a {type(rows).__name__}, which is only "
                        "read as it streams; run precompute_reference_stats on a Dataset beforehand, or keep a "
                        "live reference model (precompute_ref=False)"
                    )
                live = True
                continue
            lacking = rows_without_reference_stats(rows)
            if precompute_ref or 0 < len(lacking) < len(rows):
                if lacking:
                    self._rows_to_precompute[name] = lacking
            elif len(lacking) == len(rows):  # no statistics (or no rows)
                live = True
        self.precompute_ref = precompute_ref or not live  # keep no reference model
        self.peft_reference = ref_model is None and is_peft_model(model)  # the base, adapters disabled
        if ref_model is None and not (self.peft_reference or self.precompute_ref):
            ref_model = copy.deepcopy(model)
        self.ref_model = None if ref_model is None else ref_model.eval().requires_grad_(False)
        self._metrics: dict[str, list[float]] = defaultdict(list)  # training: each step's means, until logged
        self._eval_rows: list[Tensor] = []  # evaluation: each batch's per-row values and weights
        self.switch_attention = False  # the prefix-shared steps run with mask_attention_implementation
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if choose_layout:  # after Trainer moved the model to its device: the probe runs there
            self._choose_layout()
        if self._rows_to_precompute:
            self._precompute_reference(self._rows_to_precompute)
        if self.precompute_ref:
            self.ref_model = None  # the statistics are in the rows
        elif self.ref_model is not None:
            self.ref_model = prepare_reference_model(self.ref_model, self.accelerator)

    def _set_signature_columns_if_needed(self) -> None:
        # The collator reads the raw row columns, not the model's forward arguments.
        if self._signature_columns is None:
            self._signature_columns = [*ROW_COLUMNS, *PRECOMPUTED_COLUMNS]

    # ------------------------------------------------------------------ model -> per-response statistics

    def _choose_layout(self) -> None:
        """Keep ``layout="prefix_shared"`` if the policy and the reference run it exactly, else fall back to padded.

        A model whose attention implementation takes no custom mask (``flash_attention_2`` / ``_3``)
        is checked, and later stepped, with :func:`~rcpo_losses.training.model_stats.mask_attention_implementation`
        (``flex_attention`` on CUDA, ``sdpa`` on the CPU);
        :func:`~rcpo_losses.training.model_stats.prefix_shared_problem` then refuses the family by name
        or runs its first-seen probe. One logged line for a switch, one for a fallback.
        """
        models = [m for m in (self.model, self.ref_model) if m is not None]
        for m in models:
            with attention_implementation(m, mask_attention_implementation(m)):
                reason = prefix_shared_problem(m)
            if reason is not None:
                logger.warning("RCPOTrainer: %s; falling back to layout='padded'", reason)
                self.data_collator.layout = "padded"
                return
        switched = [(m, impl) for m in models if (impl := mask_attention_implementation(m))]
        if switched:
            m, switch = switched[0]
            own = self.accelerator.unwrap_model(m).config._attn_implementation
            logger.warning(
                "RCPOTrainer: attention implementation %r takes no custom attention mask; the prefix-shared "
                "training and evaluation steps run with %r (the model keeps %r outside them: generation, saving)",
                own, switch, own,
            )  # fmt: skip
            self.switch_attention = True

    def step_context(self):
        """Where the trainer's steps run: with ``switch_attention``, each model in its mask-taking implementation.

        :func:`~rcpo_losses.training.model_stats.mask_attention_implementation` for the models that need one,
        around the whole step (forward and backward: gradient checkpointing recomputes the forward
        in the backward), so that ``model.config`` keeps the user's implementation between steps,
        where checkpoints are saved and ``generate`` runs.
        """
        stack = contextlib.ExitStack()
        if self.switch_attention and self.data_collator.layout == "prefix_shared":
            for m in (self.model, self.ref_model):
                if m is not None:
                    stack.enter_context(attention_implementation(m, mask_attention_implementation(m)))
        return stack

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.step_context():
            return super().training_step(model, inputs, num_items_in_batch)

    def response_stats(self, model, inputs: dict[str, Tensor], *, entropy: bool = True) -> ResponseTokenStats:
        """Summed completion log-probs, entropy sums and lengths ``[B, S]``: :func:`rcpo_losses.response_stats`.

        The one function that gives the policy's, the live reference's and the precomputed
        reference's statistics, for either layout of the collator; the model runs through its own
        forward (DDP's hooks run), the LM head (fused with ``fused_linear``) only on the rows that
        predict a completion token; padding slots (``IGNORE``) get 0.
        """
        return response_stats(model, inputs, fused_linear=self.fused_linear, entropy=entropy)

    # ------------------------------------------------------------------ the reference model

    @contextlib.contextmanager
    def reference_context(self, model):
        """Where the reference runs: eval mode (no dropout), inside ``model.disable_adapter()`` for the PEFT base.

        ``model`` is the reference itself, or the policy for the PEFT base; every module's
        train/eval flag is restored after.
        """
        inner = self.accelerator.unwrap_model(model)
        with eval_mode(inner), inner.disable_adapter() if self.peft_reference else contextlib.nullcontext():
            yield

    def reference_stats(self, model, inputs: dict[str, Tensor]) -> ResponseTokenStats:
        """The reference statistics ``[B, S]``: the batch's precomputed ``ref_*`` columns, or a no-grad forward.

        ``model`` is the policy, which is the reference with its adapters disabled for a PEFT
        model without ``ref_model``.
        """
        if "ref_logps" in inputs:
            return ResponseTokenStats(*(inputs[name] for name in REF_COLUMNS))  # fp64 for an fp64 model's values
        if self.ref_model is None and not self.peft_reference:
            raise ValueError(
                "inputs: the batch has no precomputed ref_logps / ref_entropy_sums / ref_lengths and the trainer "
                "holds no reference model; precompute them for every dataset (precompute_ref=True)"
            )
        reference = model if self.ref_model is None else self.ref_model
        with torch.no_grad(), self.reference_context(reference):
            stats = self.response_stats(reference, inputs)
        if self.ref_model is not None:
            release_reference(self.ref_model)  # an FSDP2 reference's root goes back to its shard
        return stats

    @contextlib.contextmanager
    def _forward_as_in_training(self, model):
        """``model.forward`` as the accelerator wraps it for training (``bf16`` / ``fp16``: autocast, fp32 outputs).

        So that precomputed statistics are the numbers the live reference would give at each step.
        """
        if not self.accelerator.native_amp or "_original_forward" in vars(model):  # no autocast, or wrapped already
            yield
            return
        from accelerate.utils import convert_outputs_to_fp32

        forward, own = model.forward, vars(model).get("forward")

        def autocast_forward(*args, **kwargs):
            with self.accelerator.autocast():
                return forward(*args, **kwargs)

        model.forward = convert_outputs_to_fp32(autocast_forward)
        try:
            yield
        finally:
            if own is None:
                del model.forward  # the class's forward again
            else:
                model.forward = own

    def _reference_response_stats(self, model, inputs, *, fused_linear: bool, entropy: bool) -> ResponseTokenStats:
        """:meth:`response_stats` (an override included) as ``precompute_reference_stats`` calls it."""
        return self.response_stats(model, inputs, entropy=entropy)

    def _precompute_reference(self, missing: dict[str, list[int]]) -> None:
        """Add the reference's ``ref_*`` columns to the rows ``missing[name]`` of each dataset (``named_datasets``).

        The other rows keep theirs. With several processes each computes every ``world``-th of
        those rows and the columns are gathered, so every rank ends with the whole dataset's
        statistics.
        """
        reference = self.model if self.ref_model is None else self.ref_model.to(self.args.device)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index

        def add(argument, rows):
            if argument not in missing:
                return rows
            positions = missing[argument]
            if len(positions) < len(rows):
                logger.info("RCPOTrainer: %s: computing the reference statistics of the %d of its %d rows that "
                            "carry none", argument, len(positions), len(rows))  # fmt: skip
            indices = positions[rank::world]
            with self.reference_context(reference), self._forward_as_in_training(reference), self.step_context():
                part = precompute_reference_stats(
                    reference, [rows[i] for i in indices], self.data_collator,
                    batch_size=self.args.per_device_eval_batch_size, fused_linear=self.fused_linear,
                    progress=not self.args.disable_tqdm and self.accelerator.is_local_main_process,
                    stats=self._reference_response_stats, indices=indices,
                )  # fmt: skip
            parts = [[[row[name] for name in PRECOMPUTED_COLUMNS] for row in part]]
            if world > 1:
                from accelerate.utils import gather_object

                parts = gather_object(parts)  # one list per rank
            columns = {name: [None] * len(positions) for name in PRECOMPUTED_COLUMNS}
            for r, values in enumerate(parts):
                for i, row in zip(range(r, len(positions), world), values, strict=True):
                    for name, value in zip(PRECOMPUTED_COLUMNS, row, strict=True):
                        columns[name][i] = value
            return with_reference_columns(rows, columns, positions)

        self.train_dataset = add("train_dataset", self.train_dataset)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {key: add(f"eval_dataset[{key!r}]", rows) for key, rows in self.eval_dataset.items()}
        else:
            self.eval_dataset = add("eval_dataset", self.eval_dataset)

    # ------------------------------------------------------------------ loss and metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ranks = inputs["ranks"]
        policy = self.response_stats(model, inputs, entropy=False)
        ref = self.reference_stats(model, inputs)
        dtype = policy.logps.dtype  # stored fp64 statistics with an fp32 policy
        ref = ref._replace(logps=ref.logps.to(dtype), entropy_sums=ref.entropy_sums.to(dtype))
        vocab_size = self.vocab_size
        loss_ranks = top_bottom_ranks(ranks) if self.loss_name in PAIRWISE else ranks
        neg_log_phi = entropy_dispersion(ref.entropy_sums, ref.lengths, loss_ranks, vocab_size)
        # evaluation: each row's loss (a sum over its pairs and their count for dpo_all_pairs), so that
        # evaluate() reports the mean over rows (pairs) whatever the batch size and the number of processes
        loss_fn = self.loss_fn if self.model.training else self._row_loss_fn
        if self.loss_name in PAIRWISE:
            rows = torch.arange(ranks.shape[0], device=ranks.device)
            win, lose = ((loss_ranks == v).int().argmax(-1) for v in (0, UNRANKED))
            pick = [(x[rows, win], x[rows, lose]) for x in (policy.logps, ref.logps)]
            extra = {"neg_log_phi": neg_log_phi} if self.loss_name.startswith("mallows") else {}
            loss = loss_fn(*pick[0], *pick[1], **extra)
        elif self.loss_name == "dpo_all_pairs":
            loss = self._all_pairs_loss(policy.logps, ref.logps, ranks, num_items_in_batch)
        else:
            if self.loss_name.endswith("discrete"):
                loss_ranks = torch.where(ranks > 0, UNRANKED, ranks)  # the list's first pick
            extra = {"neg_log_phi": neg_log_phi} if self.loss_name.startswith("mallows") else {}
            loss = loss_fn(policy.logps, ref.logps, loss_ranks, **extra)
        rewards = self.beta * (policy.logps.detach() - ref.logps)
        if self.model.training:
            self._store_metrics(rewards, ranks, neg_log_phi)
        else:
            loss = self._store_eval_rows(loss, rewards, ranks, neg_log_phi)
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def _all_pairs_loss(self, policy_logps: Tensor, ref_logps: Tensor, ranks: Tensor, num_items_in_batch):
        """DPO on every implied pair, each pair weighted alike over the whole accumulated batch.

        ``num_items_in_batch`` (training: the pairs of every micro-batch of the step, on every
        rank, over the number of ranks, from :meth:`_get_num_items_in_batch`) divides the sum of
        this micro-batch's pair losses, so the update does not depend on how the rows are split
        into micro-batches or ranks. In evaluation: each row's sum of pair losses and its number of
        pairs, ``([B], [B])``, which :meth:`evaluation_loop` divides over all the rows.
        """
        pairs = all_pairs(ranks)
        logps = policy_logps[pairs.row], ref_logps[pairs.row], pairs.ranks
        if not self.model.training:
            zeros = torch.zeros(ranks.shape[0], device=ranks.device, dtype=policy_logps.dtype)
            losses = self._row_loss_fn(*logps).to(zeros.dtype)
            return zeros.index_add(0, pairs.row, losses), zeros.index_add(0, pairs.row, torch.ones_like(losses))
        if num_items_in_batch is None:
            return self.loss_fn(*logps)
        total = mnl_topk(*logps, beta=self.beta, reduction="sum")
        return total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1).to(total.dtype)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """``dpo_all_pairs``: the number of pairs in this step's micro-batches (the loss divides by it).

        Averaged over the processes, as DDP averages their gradients, when
        ``average_tokens_across_devices`` (the default) and there are several; other losses: the
        ``Trainer``'s own count (None for these batches, which carry no ``labels``).
        """
        if self.loss_name != "dpo_all_pairs":
            return super()._get_num_items_in_batch(batch_samples, device)
        count = sum(all_pairs(batch["ranks"]).row.numel() for batch in batch_samples)
        count = torch.tensor(float(count), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count[None]).sum() / self.args.world_size
        return count

    def _metric_rows(self, rewards: Tensor, ranks: Tensor, neg_log_phi: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's reward metrics (``METRIC_NAMES``) ``[B, 4]``, and whether the row counts ``[B, 1]``."""
        found = ranking_metrics(rewards, ranks, reduction="none")
        values = [kendall_tau(rewards, ranks, reduction="none"), found["top1_accuracy"], found["margin"], neg_log_phi]
        per_row = torch.stack([v.to(found["margin"].dtype) for v in values], -1)
        valid = valid_rows(ranks)[:, None].to(per_row.dtype)  # every row of a validated batch
        return per_row * valid, valid

    def _store_metrics(self, rewards: Tensor, ranks: Tensor, neg_log_phi: Tensor) -> None:
        """Training: keep the step's reward metrics, means over its rows, until the next log.

        Kept on this process only: :meth:`log`, which every process calls at the same steps, averages
        them over the processes. (A gather here would make every process wait for each other's
        steps, and a trainer that skips a step on one process, as the online one may, would hang.)
        """
        per_row, valid = self._metric_rows(rewards, ranks, neg_log_phi)
        means = (per_row.sum(0) / valid.sum().clamp(min=1)).tolist()
        for name, value in zip(METRIC_NAMES, means, strict=True):
            self._metrics[name].append(value)

    def _store_eval_rows(self, loss, rewards: Tensor, ranks: Tensor, neg_log_phi: Tensor) -> Tensor:
        """Evaluation: keep each row's loss and reward metrics; the batch's mean loss.

        ``loss`` is each row's loss ``[B]`` (0 in a row left out), or for ``dpo_all_pairs`` each
        row's sum over its pairs and their number. The rows of every process are gathered with
        ``gather_for_metrics``, which drops those the sampler repeated to give every process the
        same number of batches; :meth:`evaluation_loop` then divides the sums over all the rows.
        """
        per_row, valid = self._metric_rows(rewards, ranks, neg_log_phi)
        loss_sums, loss_counts = loss if isinstance(loss, tuple) else (loss.to(valid.dtype) * valid[:, 0], valid[:, 0])
        sums = torch.cat([loss_sums.detach().to(valid.dtype)[:, None], per_row], -1)
        counts = torch.cat([loss_counts.to(valid.dtype)[:, None], valid.expand_as(per_row)], -1)
        self._eval_rows.append(self.accelerator.gather_for_metrics(torch.stack([sums, counts], 1)))  # [B, 2, 5]
        return loss_sums.sum() / loss_counts.sum().clamp(min=1)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager(), self.step_context():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):  # fmt: skip
        """The ``Trainer``'s loop (``evaluate()`` and ``predict()``), with the reward metrics of its own rows.

        They go into the loop's metrics under ``metric_key_prefix`` (``eval``, ``test`` for
        ``predict()``, ``eval_<name>`` for each of a dict of eval datasets), which ``evaluate()`` logs.
        """
        self._eval_rows.clear()
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            if self._eval_rows:  # means over the rows (each counted once), not over the batches
                sums, counts = torch.cat(self._eval_rows).double().sum(0)
                for name, value in zip(("loss", *METRIC_NAMES), (sums / counts.clamp(min=1)).tolist(), strict=True):
                    output.metrics[f"{metric_key_prefix}_{name}"] = value
        finally:
            self._eval_rows.clear()
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:  # evaluation metrics are reported by evaluation_loop
            logs.update(self.mean_over_processes(self._metrics))
            self._metrics.clear()
        super().log(logs, start_time)

    def mean_over_processes(self, values: dict[str, list[float]]) -> dict[str, float]:
        """Each name's mean over this process's values since the last log, averaged over the processes.

        A collective: every process calls it at the same point (:meth:`log`), with the same names
        (a name this process has no values of counts as NaN here and is left out of the mean).
        """
        names = sorted(values)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            names = sorted({n for found in gather_object([names]) for n in found})
        means = torch.tensor(
            [sum(values[n]) / len(values[n]) if values.get(n) else math.nan for n in names], dtype=torch.float64
        )
        if self.accelerator.num_processes > 1 and names:
            means = self.accelerator.gather(means.to(self.args.device)[None]).reshape(-1, len(names)).cpu()
            means = means.nanmean(0)
        return {n: float(v) for n, v in zip(names, means.reshape(-1).tolist(), strict=True) if math.isfinite(v)}

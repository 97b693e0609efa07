"""``RCPOTrainer``: a ``transformers.Trainer`` that trains a causal LM on ranked completions.

::

    from rcpo_losses.training.trainer import RCPOTrainer

    trainer = RCPOTrainer(model, args=TrainingArguments("out"), train_dataset=rows,
                          processing_class=tokenizer, loss="mallows_rmj_topk", beta=0.1, k=2)
    trainer.train()

Rows as :class:`rcpo_losses.training.data.RankedPreferenceCollator` reads them. See docs/integration.md.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import defaultdict

import torch
from torch import Tensor
from transformers import Trainer

from .. import nn as rcpo_nn
from ..dispersion import entropy_dispersion
from ..metrics import ranking_metrics
from ..mnl import mnl_topk
from ..ranks import IGNORE, UNRANKED, all_pairs, in_assortment
from ..tokens.lm_head import eval_mode
from ..tokens.stats import ResponseTokenStats
from .data import PRECOMPUTED_COLUMNS, REF_COLUMNS, ROW_COLUMNS, RankedPreferenceCollator
from .model_stats import (
    attention_implementation,
    mask_attention_implementation,
    prefix_shared_problem,
    response_stats,
)
from .precompute import has_reference_stats, precompute_reference_stats, with_reference_columns
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


def kendall_tau(rewards: Tensor, ranks: Tensor) -> Tensor:
    """Kendall tau of the rewards with the observed lists: mean over rows of the mean ``sign(r_w - r_l)``.

    The pairs are those the top-k list implies (:func:`rcpo_losses.all_pairs`); tied rewards count 0.
    """
    pairs = all_pairs(ranks)
    r = torch.where(in_assortment(ranks), rewards.detach().float(), 0.0)[pairs.row]
    winner = (pairs.ranks == 0).int().argmax(-1, keepdim=True)
    loser = (pairs.ranks == UNRANKED).int().argmax(-1, keepdim=True)
    sign = torch.sign(r.gather(-1, winner) - r.gather(-1, loser))[:, 0]
    B = ranks.shape[0]
    total = torch.zeros(B, device=r.device).index_add_(0, pairs.row, sign)
    count = torch.zeros(B, device=r.device).index_add_(0, pairs.row, torch.ones_like(sign))
    rows = count > 0
    return (total[rows] / count[rows]).mean() if rows.any() else torch.zeros((), device=r.device)


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
        max_length, max_prompt_length, ties: passed to the collator.
        precompute_ref: run the reference once over ``train_dataset`` and ``eval_dataset``
            before training (:func:`~rcpo_losses.precompute_reference_stats`, batches of
            ``args.per_device_eval_batch_size``, through :meth:`response_stats` and under the
            autocast of training, ``bf16`` / ``fp16``) and keep no reference model. Rows that
            already carry the ``ref_logps``, ``ref_entropy_sums``, ``ref_lengths`` and
            ``ref_token_hash`` columns need no reference model either.
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
    averaged over the steps since the last log; ``evaluate()`` reports the same over its own
    rows, under its ``metric_key_prefix`` (``eval_``, ``eval_<name>_`` for a dict of datasets,
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
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        datasets = [d for d in (train_dataset, eval_dataset) if d is not None]
        self.precompute_ref = precompute_ref or (bool(datasets) and all(map(has_reference_stats, datasets)))
        self.peft_reference = ref_model is None and is_peft_model(model)  # the base, adapters disabled
        if ref_model is None and not (self.peft_reference or self.precompute_ref):
            ref_model = copy.deepcopy(model)
        self.ref_model = None if ref_model is None else ref_model.eval().requires_grad_(False)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
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
        if self.precompute_ref:
            self._precompute_reference()
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

    def _precompute_reference(self) -> None:
        """Add the reference's ``ref_*`` columns to the datasets that lack them; keep no reference model.

        With several processes each computes every ``world``-th row and the columns are gathered,
        so every rank ends with the whole dataset's statistics.
        """
        reference = self.model if self.ref_model is None else self.ref_model.to(self.args.device)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index

        def add(rows):
            if rows is None or has_reference_stats(rows):
                return rows
            indices = range(rank, len(rows), world)
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
            columns = {name: [None] * len(rows) for name in PRECOMPUTED_COLUMNS}
            for r, values in enumerate(parts):
                for i, row in zip(range(r, len(rows), world), values, strict=True):
                    for name, value in zip(PRECOMPUTED_COLUMNS, row, strict=True):
                        columns[name][i] = value
            return with_reference_columns(rows, columns)

        self.train_dataset = add(self.train_dataset)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {name: add(rows) for name, rows in self.eval_dataset.items()}
        else:
            self.eval_dataset = add(self.eval_dataset)
        self.ref_model = None  # the statistics are in the rows now

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
        if self.loss_name in PAIRWISE:
            rows = torch.arange(ranks.shape[0], device=ranks.device)
            win, lose = ((loss_ranks == v).int().argmax(-1) for v in (0, UNRANKED))
            pick = [(x[rows, win], x[rows, lose]) for x in (policy.logps, ref.logps)]
            extra = {"neg_log_phi": neg_log_phi} if self.loss_name.startswith("mallows") else {}
            loss = self.loss_fn(*pick[0], *pick[1], **extra)
        elif self.loss_name == "dpo_all_pairs":
            loss = self._all_pairs_loss(policy.logps, ref.logps, ranks, num_items_in_batch)
        else:
            if self.loss_name.endswith("discrete"):
                loss_ranks = torch.where(ranks > 0, UNRANKED, ranks)  # the list's first pick
            extra = {"neg_log_phi": neg_log_phi} if self.loss_name.startswith("mallows") else {}
            loss = self.loss_fn(policy.logps, ref.logps, loss_ranks, **extra)
        rewards = self.beta * (policy.logps.detach() - ref.logps)
        self._store_metrics(rewards, ranks, neg_log_phi)
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def _all_pairs_loss(self, policy_logps: Tensor, ref_logps: Tensor, ranks: Tensor, num_items_in_batch) -> Tensor:
        """DPO on every implied pair, each pair weighted alike over the whole accumulated batch.

        ``num_items_in_batch`` (training: the pairs of every micro-batch of the step, on every
        rank, over the number of ranks, from :meth:`_get_num_items_in_batch`) divides the sum of
        this micro-batch's pair losses, so the update does not depend on how the rows are split
        into micro-batches or ranks; without it (evaluation), the mean over this batch's pairs.
        """
        pairs = all_pairs(ranks)
        if num_items_in_batch is None:
            return self.loss_fn(policy_logps[pairs.row], ref_logps[pairs.row], pairs.ranks)
        total = mnl_topk(policy_logps[pairs.row], ref_logps[pairs.row], pairs.ranks, beta=self.beta, reduction="sum")
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

    def _store_metrics(self, rewards: Tensor, ranks: Tensor, neg_log_phi: Tensor) -> None:
        found = ranking_metrics(rewards, ranks)
        values = torch.stack(
            [kendall_tau(rewards, ranks), found["top1_accuracy"].float(), found["margin"].float(), neg_log_phi.mean()]
        )
        values = self.accelerator.gather(values[None]).reshape(-1, len(values)).mean(0).tolist()
        mode = "train" if self.model.training else "eval"
        names = ("rewards/kendall_tau", "rewards/top1_accuracy", "rewards/margins", "dispersion/neg_log_phi")
        for name, value in zip(names, values, strict=True):
            self._metrics[mode][name].append(value)

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
        self._metrics["eval"].clear()
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            for name, values in self._metrics["eval"].items():
                output.metrics[f"{metric_key_prefix}_{name}"] = sum(values) / len(values)
        finally:
            self._metrics["eval"].clear()
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:  # evaluation metrics are reported by evaluation_loop
            for name, values in self._metrics["train"].items():
                logs[name] = sum(values) / len(values)
            self._metrics["train"].clear()
        super().log(logs, start_time)

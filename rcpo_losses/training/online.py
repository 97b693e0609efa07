"""``OnlineRCPOTrainer``: RCPO on the policy's own samples, ranked by reward functions at every step.

::

    from rcpo_losses.training.online import OnlineRCPOTrainer

    trainer = OnlineRCPOTrainer(model, reward_funcs=[my_reward], args=TrainingArguments("out"),
                                train_dataset=[{"prompt": "Write a review: "}, ...], processing_class=tokenizer,
                                loss="mallows_rmj_topk", k=2, beta=0.1, num_generations=5)
    trainer.train()

Each step samples a group of ``num_generations`` completions of each prompt from the current
policy, scores them, and trains on their ranking with the offline path's collator and losses
(:class:`~rcpo_losses.training.trainer.RCPOTrainer`). See docs/integration.md, "Online".
"""

from __future__ import annotations

# ruff: noqa: E402
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import versions

# Before transformers is imported: an older transformers, accelerate or peft (which transformers' trainer
# imports when it is installed) raises ImportError naming both versions, not an error from deep inside.
versions.require("transformers")
versions.require("accelerate")
versions.require("peft")

from transformers import Trainer

from ..ranks import IGNORE
from ..tokens.lm_head import eval_mode
from .data import best_and_worst, encode_prompt, is_conversational
from .generate import RewardModel, batch_seed, rank_samples, sample_completions
from .trainer import PAIRWISE, RCPOTrainer, kendall_tau

# A prompt-only dataset: these columns mean the rows carry completions or feedback already.
NOT_PROMPT_COLUMNS = ("completions", "completion", "chosen", "rejected", "scores", "ranking", "completion_ids")


def reward_name(func) -> str:
    """The name a reward function is logged under: its ``__name__``, or a model's ``config._name_or_path`` tail."""
    if isinstance(func, tuple):
        func = func[0]
    config = getattr(func, "config", None)
    if config is not None:
        return str(getattr(config, "_name_or_path", "") or type(func).__name__).split("/")[-1]
    return getattr(func, "__name__", type(func).__name__)


class WeightedReward:
    """Several reward functions as one: ``sum_f w_f * reward_f``, TRL's combination (``None`` scores skipped).

    Each function is called with TRL's keywords (``prompts=``, ``completions=``,
    ``completion_ids=``, every other column of the prompt rows, ``**kwargs``); a
    ``(sequence-classification model, tokenizer)`` pair is a :class:`~rcpo_losses.training.generate.RewardModel`.
    A function may return ``None`` for a completion it does not apply to (TRL's convention);
    the weighted sum skips it. A completion that every function leaves ``None`` raises
    ``ValueError`` naming its prompt, as does a NaN or infinite score, or the wrong count.
    The last call's per-function scores stay in ``last`` (``[n, F]``, NaN for ``None``) for logging.
    """

    def __init__(self, funcs: Sequence[Any], weights: Sequence[float] | None = None):
        funcs = list(funcs) if isinstance(funcs, (list, tuple)) and not _is_model_pair(funcs) else [funcs]
        if not funcs:
            raise ValueError("reward_funcs: give at least one reward function")
        self.funcs = [RewardModel(*f) if _is_model_pair(f) else f for f in funcs]
        for f in self.funcs:
            if not callable(f):
                raise TypeError(f"reward_funcs: {f!r} is not callable (a function, or a (model, tokenizer) pair)")
        weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(funcs) or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"reward_weights: expected {len(funcs)} finite numbers, one per function, got {weights}")
        self.weights = weights
        self.names = [reward_name(f) for f in funcs]
        self.last = torch.zeros(0, len(funcs))

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        n = len(completions)
        per_func = torch.full((n, len(self.funcs)), math.nan, dtype=torch.float64)
        for i, (f, name) in enumerate(zip(self.funcs, self.names, strict=True)):
            found = list(f(prompts=prompts, completions=completions, **kwargs))
            if len(found) != n:
                raise ValueError(f"reward_funcs: {name!r} returned {len(found)} scores for {n} completions")
            for j, s in enumerate(found):
                if s is None:
                    continue
                s = float(s)
                if not math.isfinite(s):
                    raise ValueError(
                        f"reward_funcs: {name!r} scored {s} on completion {j} of prompt {_start(prompts[j])}"
                    )
                per_func[j, i] = s
        none = per_func.isnan().all(-1)
        if none.any():
            j = int(none.nonzero()[0, 0])
            raise ValueError(
                f"reward_funcs: every function returned None for completion {j} of prompt {_start(prompts[j])}; "
                "at least one must score each completion"
            )
        self.last = per_func
        weights = torch.tensor(self.weights, dtype=torch.float64)
        return (per_func * weights).nansum(-1).tolist()


def _is_model_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], torch.nn.Module)


def _start(prompt: Any, width: int = 40) -> str:
    text = " ".join(str(m.get("content", "")) for m in prompt) if is_conversational(prompt) else str(prompt)
    text = " ".join(text.split())
    return repr(text[:width] + ("..." if len(text) > width else ""))


def _from_args(args, name: str, value, default):
    """``value``, else the field of ``args`` (a TRL ``GRPOConfig``) of that name, else ``default``."""
    if value is not None:
        return value
    found = getattr(args, name, None)
    return default if found is None else found


def _prompt_rows(rows: Sequence[Any]) -> list[dict[str, Any]]:
    return [dict(r) if isinstance(r, Mapping) else {"prompt": r} for r in rows]


class OnlineRCPOTrainer(RCPOTrainer):
    """RCPO on-policy: each step samples ``num_generations`` completions of each prompt, ranks them, trains.

    At each micro-batch of prompts:

    1. the current policy samples ``num_generations`` completions of each prompt, in eval mode (no
       dropout), under no grad, with the sampler of :func:`~rcpo_losses.training.generate.rank_completions`
       (or its ``generate=`` hook: vLLM or any engine);
    2. identical completions of a prompt are merged (one response of the assortment), the
       distinct ones are scored by ``reward_funcs`` (weighted by ``reward_weights``) and ranked
       by :func:`~rcpo_losses.training.generate.rank_samples`;
    3. the groups train with the loss of :class:`RCPOTrainer` (``loss``, ``k``, ``beta``, ``ties``)
       against the reference (a frozen copy of the initial model, or for PEFT the base with the
       adapters disabled: one no-grad forward of the fresh samples), in the prefix-shared layout:
       each prompt is computed once, its completions after it.

    Ties: a group whose rewards are all equal (or whose completions are all the same text)
    carries no ranking: it is skipped, counted and logged (``frac_reward_zero_std``, as GRPO's
    zero advantages). Partial ties follow the collator's ``ties`` rule (default ``"leave_out"``:
    the tied groups above the first untied completion leave the assortment; never an order by
    position; :func:`~rcpo_losses.training.data.row_ranks`). A pairwise loss (``mnl_pairwise``,
    ``mallows_rmj_pairwise``: online DPO) reads each group's best and worst completion among those
    whose reward no other shares (:func:`~rcpo_losses.training.data.best_and_worst`); a group
    without two such is skipped too (``frac_no_untied_pair``). A micro-batch whose groups are all
    skipped contributes a zero loss (and zero gradients).

    Args:
        model: the policy, a causal LM (a PEFT model: the reference is its base).
        reward_funcs: a reward function ``reward(prompts, completions, **columns) -> list[float | None]``
            (TRL's convention: also ``completion_ids=`` and every other column of the prompt rows),
            a ``(sequence-classification model, tokenizer)`` pair, or a list of them.
        args: ``TrainingArguments``, or TRL's ``GRPOConfig``: its ``num_generations``,
            ``max_completion_length``, ``temperature``, ``top_p``, ``top_k``, ``beta`` and
            ``reward_weights`` are used where the argument here is ``None``. Its
            ``per_device_train_batch_size`` counts completions, as in TRL (a multiple of
            ``num_generations``); with ``TrainingArguments`` it counts prompts.
        train_dataset: prompt rows ``{"prompt": text or messages, **columns}`` (or prompts alone).
        eval_dataset: prompt rows, sampled and ranked the same way by ``evaluate()``.
        processing_class: the tokenizer.
        reward_weights: one weight per reward function (default 1 each).
        num_generations: completions sampled per prompt (default 5), at least 2.
        max_completion_length: most tokens sampled per completion (default 256); a completion cut
            there is trained on the tokens it has, without an end token.
        temperature, top_p, top_k: sampling (defaults 1.0, 1.0, 0: no top-k).
        generate: ``generate(prompt_texts, num_samples, seed) -> per prompt, completions`` as
            :func:`~rcpo_losses.training.generate.rank_completions` takes it (vLLM, a server).
        loss, beta, k, ties, ref_model, fused_linear, max_prompt_length, layout: as :class:`RCPOTrainer`.
        **kwargs: the other ``Trainer`` arguments.

    Logs, per logging step (means over the steps since the last log, over all processes):
    ``reward`` and ``reward_std`` (weighted; the std within each group, averaged over groups),
    ``rewards/<function>/mean`` and ``/std``, ``frac_reward_zero_std`` (share of groups skipped),
    ``completions/mean_length`` and ``completions/clipped_ratio`` (share cut at
    ``max_completion_length``), ``kl`` (the sampled estimate of KL(pi || pi_ref): the mean over
    sampled completions of ``log pi - log pi_ref``), ``rewards/kendall_tau`` (the implicit
    reward's Kendall tau against the reward's ranking) and the other metrics of
    :class:`RCPOTrainer`, and ``time/sampling``, ``time/scoring``, ``time/training`` (seconds per
    step) with ``tokens_per_second/sampling`` and ``tokens_per_second/training``.

    Resuming from a checkpoint continues the same run: the sampling seed of each micro-batch is
    a function of ``args.seed``, the global step, the micro-batch and the process alone.
    """

    def __init__(
        self,
        model=None,
        reward_funcs=None,
        args=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        reward_weights: Sequence[float] | None = None,
        num_generations: int | None = None,
        max_completion_length: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        generate: Callable | None = None,
        loss: str = "mallows_rmj_topk",
        beta: float | None = None,
        k: int | None = None,
        ties: str = "leave_out",
        ref_model=None,
        fused_linear: bool = False,
        max_prompt_length: int | None = None,
        layout: str = "prefix_shared",
        **kwargs,
    ):
        if reward_funcs is None:
            raise ValueError("reward_funcs: OnlineRCPOTrainer ranks its samples with reward functions; give one")
        if kwargs.get("data_collator") is not None:
            raise ValueError("data_collator: the online trainer builds its batches from its own samples; drop it")
        if kwargs.get("precompute_ref"):
            raise ValueError("precompute_ref: the samples are new at every step; the reference runs on each")
        self.num_generations = int(_from_args(args, "num_generations", num_generations, 5))
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations: a ranking needs at least 2 completions per prompt, got {self.num_generations}"
            )
        self.max_completion_length = int(_from_args(args, "max_completion_length", max_completion_length, 256))
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length: expected a positive int, got {self.max_completion_length}")
        self.temperature = float(_from_args(args, "temperature", temperature, 1.0))
        self.top_p = float(_from_args(args, "top_p", top_p, 1.0))
        self.top_k = int(_from_args(args, "top_k", top_k, 0) or 0)
        if not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            raise ValueError(
                f"temperature, top_p, top_k: expected temperature > 0, 0 < top_p <= 1, top_k >= 0, got "
                f"{self.temperature}, {self.top_p}, {self.top_k}"
            )
        beta = _from_args(args, "beta", beta, 0.1)
        if not beta > 0:
            raise ValueError(
                f"beta: {beta}; the choice losses need beta > 0 (it scales the implicit reward beta * log pi/pi_ref). "
                "TRL's GRPOConfig defaults to beta=0.0: set it, or pass beta= here"
            )
        self.reward = WeightedReward(reward_funcs, _from_args(args, "reward_weights", reward_weights, None))
        self.generate_fn = generate
        train_dataset = self._check_prompts(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {n: self._check_prompts(d, f"eval_dataset[{n!r}]") for n, d in eval_dataset.items()}
        else:
            eval_dataset = self._check_prompts(eval_dataset, "eval_dataset")
        self._micro = (-1, 0)  # (global step, micro-batches seen in it): the sampling seed's counter
        self._online: dict[str, list[float]] = {}  # training: each micro-batch's sampling metrics, until logged
        self._online_eval: dict[str, list[float]] = {}
        self.last_ranked = None  # the last micro-batch's rank_samples result
        super().__init__(
            model,
            ref_model,
            args,
            train_dataset,
            eval_dataset,
            processing_class,
            loss=loss,
            beta=beta,
            k=k,
            fused_linear=fused_linear,
            max_prompt_length=max_prompt_length,
            ties=ties,
            layout=layout,
            **kwargs,
        )
        self._refuse_sharded_generation()
        if type(self.args).__name__ == "GRPOConfig":  # TRL counts completions per device batch
            per_device = self.args.per_device_train_batch_size
            if per_device % self.num_generations:
                raise ValueError(
                    f"args.per_device_train_batch_size: {per_device} completions is not a multiple of "
                    f"num_generations = {self.num_generations} (a GRPOConfig counts completions, as TRL does)"
                )
            self._train_batch_size = max(1, per_device // self.num_generations) * max(1, self.args.n_gpu)

    # ------------------------------------------------------------------ inputs

    @staticmethod
    def _check_prompts(dataset, name: str):
        if dataset is None:
            return None
        columns = getattr(dataset, "column_names", None)
        if columns is None:
            first = next(iter(dataset), None)
            columns = list(first) if isinstance(first, Mapping) else []
        found = [c for c in NOT_PROMPT_COLUMNS if c in columns]
        if found:
            raise ValueError(
                f"{name}: has a {found[0]!r} column: the online trainer samples the completions itself and "
                "expects prompt rows {'prompt': ...}; train on ranked rows with RCPOTrainer"
            )
        if columns and "prompt" not in columns:
            raise ValueError(f"{name}: rows need a 'prompt' column, got {sorted(columns)}")
        return dataset

    def _refuse_sharded_generation(self) -> None:
        """Sampling runs ``generate`` on the unwrapped policy: refuse configurations that shard its weights."""
        if getattr(self, "is_fsdp_enabled", False):
            raise ValueError(
                "OnlineRCPOTrainer: FSDP shards the policy's weights and sampling does not gather them; "
                "use DDP (or sample through generate=, e.g. a vLLM server holding the weights)"
            )
        if getattr(self, "is_deepspeed_enabled", False):
            stage = self.accelerator.state.deepspeed_plugin.zero_stage
            if stage == 3:
                raise ValueError(
                    "OnlineRCPOTrainer: DeepSpeed ZeRO-3 shards the policy's weights and sampling does not gather "
                    "them; use ZeRO-1/2 or DDP (or sample through generate=)"
                )

    def _remove_unused_columns(self, dataset, description=None):
        return dataset  # every column of a prompt row goes to the reward functions

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return _prompt_rows  # a micro-batch is a list of prompt rows; its samples are collated in _prepare_inputs

    def get_train_dataloader(self):
        own, self.data_collator = self.data_collator, _prompt_rows
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = own

    def get_eval_dataloader(self, eval_dataset=None):
        own, self.data_collator = self.data_collator, _prompt_rows
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = own

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        return None  # prompts, not pairs: dpo_all_pairs takes each micro-batch's mean over its pairs

    # ------------------------------------------------------------------ sample, score, rank

    def _seed(self) -> int:
        step, micro = self._micro
        micro = micro + 1 if step == self.state.global_step else 0
        self._micro = (self.state.global_step, micro)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mode = 0 if self.model.training else 1  # evaluation draws from its own stream
        return batch_seed(self.args.seed, ((self.state.global_step * 64 + micro) * world + rank) * 2 + mode)

    def sample_and_rank(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Tensor] | None, dict[str, float]]:
        """Sample a group of each prompt from the current policy, score and rank it: ``(batch, metrics)``.

        ``batch`` is the collated batch of the groups that rank something (None if none does).
        """
        policy = self.accelerator.unwrap_model(self.model)
        t0 = time.perf_counter()
        prompts = [row["prompt"] for row in rows]
        encoded = [encode_prompt(self.processing_class, p, f"prompt {_start(p)}") for p in prompts]
        texts, prompt_ids = [text for text, _ in encoded], [ids for _, ids in encoded]
        with torch.no_grad(), eval_mode(policy):
            samples, sampled_tokens = sample_completions(
                policy,
                self.processing_class,
                prompts,
                texts,
                prompt_ids,
                num_samples=self.num_generations,
                max_new_tokens=self.max_completion_length,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                seed=self._seed(),
                generate=self.generate_fn,
            )
        t1 = time.perf_counter()
        ranked = rank_samples(rows, samples, self.reward, prompt_ids=prompt_ids)
        t2 = time.perf_counter()
        self.last_ranked = ranked
        metrics = self._group_metrics(samples, ranked)
        metrics.update({"time/sampling": t1 - t0, "time/scoring": t2 - t1, "sampled_tokens": sampled_tokens})
        kept = [r for r in ranked.rows if r is not None]
        if self.loss_name in PAIRWISE:  # the best and the worst untied completion of each group
            pairs = [best_and_worst(r) for r in kept]
            metrics["frac_no_untied_pair"] = sum(p is None for p in pairs) / len(ranked.rows)
            kept = [p for p in pairs if p is not None]
        return (self.data_collator(kept) if kept else None), metrics

    def _group_metrics(self, samples, ranked) -> dict[str, float]:
        """Reward, length and skip statistics of the sampled groups (every sample counted, merged or not)."""
        per_func = self.reward.last  # [distinct completions of the scored groups, F]
        weights = torch.tensor(self.reward.weights, dtype=torch.float64)
        metrics: dict[str, float] = {}
        groups, start = [], 0
        for row in ranked.rows:
            if row is None:
                continue
            n = len(row["completions"])
            counts = torch.tensor(row["samples"], dtype=torch.float64)
            groups.append((per_func[start : start + n], counts))
            start += n
        if groups:
            values = torch.cat([torch.repeat_interleave(v, c.long(), 0) for v, c in groups])  # each sample
            total = (values * weights).nansum(-1)
            metrics["reward"] = float(total.mean())
            stds = [(v * weights).nansum(-1).repeat_interleave(c.long()).std(unbiased=False) for v, c in groups]
            metrics["reward_std"] = float(torch.stack(stds).mean())
            for i, name in enumerate(self.reward.names):
                column = values[:, i][~values[:, i].isnan()]
                if column.numel():
                    metrics[f"rewards/{name}/mean"] = float(column.mean())
                    metrics[f"rewards/{name}/std"] = float(column.std(unbiased=False))
        flat = [s for group in samples for s in group]
        lengths = [len(s.ids) for s in flat if s.ids is not None]
        if lengths:
            metrics["completions/mean_length"] = sum(lengths) / len(lengths)
        cut = [s.truncated for s in flat if s.truncated is not None]
        if cut:
            metrics["completions/clipped_ratio"] = sum(cut) / len(cut)
        metrics["frac_reward_zero_std"] = sum(r is not None for r in ranked.skipped) / len(ranked.skipped)
        return metrics

    def _record(self, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self._online.setdefault(name, []).append(float(value))

    # ------------------------------------------------------------------ the step

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()  # as Trainer.training_step does: a skipped micro-batch does not reach it
        batch, metrics = self.sample_and_rank(_prompt_rows(inputs))
        t0 = time.perf_counter()
        if batch is None:  # every group tied: nothing to rank (GRPO's zero advantages)
            loss = self._zero_step(model)
        else:
            loss = super().training_step(model, batch, None)
            metrics["training_tokens"] = float(batch["input_ids"].numel())
        metrics["time/training"] = time.perf_counter() - t0
        self._record(metrics)
        return loss

    def _zero_step(self, model) -> Tensor:
        """A forward of one token and a backward of zero times its output: zero gradients, through the model's
        own forward, so that under DDP this process reduces gradients with the others, as they expect."""
        token = self.processing_class.eos_token_id or 0
        ids = torch.tensor([[token]], device=self.args.device)
        with self.compute_loss_context_manager():
            zero = model(input_ids=ids).logits.float().sum() * 0.0
        self.accelerator.backward(zero)
        return zero.detach()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        sampled = inputs["ranks"] != IGNORE
        self._metrics["kl"].append(float(outputs["rewards"][sampled].float().mean() / self.beta))
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ evaluation

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Sample and rank a group of each eval prompt; keep its reward, KL and Kendall tau (no loss)."""
        batch, metrics = self.sample_and_rank(_prompt_rows(inputs))
        if batch is not None:
            batch = self._prepare_inputs(batch)
            with torch.no_grad(), self.compute_loss_context_manager(), self.step_context():
                policy = self.response_stats(model, batch, entropy=False)
                ref = self.reference_stats(model, batch)
            log_ratio = policy.logps - ref.logps.to(policy.logps.dtype)
            metrics["kl"] = float(log_ratio[batch["ranks"] != IGNORE].float().mean())
            metrics["rewards/kendall_tau"] = float(kendall_tau(self.beta * log_ratio, batch["ranks"]))
        for name, value in metrics.items():
            self._online_eval.setdefault(name, []).append(float(value))
        return None, None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):  # fmt: skip
        """``Trainer``'s loop over the eval prompts; the sampled groups' metrics under ``metric_key_prefix``."""
        self._online_eval = {}
        output = Trainer.evaluation_loop(self, dataloader, description, True, ignore_keys, metric_key_prefix)
        for name, value in self._rates(self.mean_over_processes(self._online_eval)).items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        self._online_eval = {}
        return output

    # ------------------------------------------------------------------ logs

    @staticmethod
    def _rates(found: dict[str, float]) -> dict[str, float]:
        """Token counts per micro-batch to tokens per second of the phase that handled them."""
        sampled, trained = found.pop("sampled_tokens", None), found.pop("training_tokens", None)
        if sampled is not None and found.get("time/sampling", 0) > 0:
            found["tokens_per_second/sampling"] = sampled / found["time/sampling"]
        if trained is not None and found.get("time/training", 0) > 0:
            found["tokens_per_second/training"] = trained / found["time/training"]
        return found

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs.update(self._rates(self.mean_over_processes(self._online)))
            self._online.clear()
        super().log(logs, start_time)

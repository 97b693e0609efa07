"""rcpo_losses.training.generate: sample, score, rank (tiny in-process models; the real model: test_real_model.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("tqdm")

from rcpo_losses.training.data import RankedPreferenceCollator  # noqa: E402
from rcpo_losses.training.generate import RewardModel, batch_seed, main, rank_completions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHAT = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "<", ">", "user", "assistant", "system", "end", "hi", "hello", "hey"]
WORDS += list("abcdefg12345?!.")
PROMPTS = [
    "hi a b",
    [{"role": "user", "content": "hey c d e"}],
    "hello",
    "a b c d e f g",
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi !"}],
    "1 2 3",
    "g f e",
]


def make_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    out = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    if chat:
        out.chat_template = CHAT
    return out


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    # A biased head: no <pad>, <bos>, <unk> sampled (each decoded completion re-tokenizes to its tokens),
    # and EOS likely enough that some completions end before max_new_tokens.
    head = torch.nn.Linear(32, len(WORDS), bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[[0, 1, 3]] = -1e4
        head.bias[2] = 0.5
    model.lm_head = head
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model()


def text_of(completion):
    return completion if isinstance(completion, str) else completion[0]["content"]


def length_reward(prompts, completions):
    """Longer is better; the completion index within the call breaks ties, so that every row ranks."""
    return [len(text_of(c)) + 1e-3 * j for j, c in enumerate(completions)]


def slow_length_reward(prompts, completions):
    """``length_reward`` that takes a while, so that a test can kill the process between batches."""
    time.sleep(0.3)
    return length_reward(prompts, completions)


def run(model, tokenizer, prompts=PROMPTS, reward=length_reward, **kwargs):
    kwargs = {"num_samples": 3, "max_new_tokens": 6, "batch_size": 3, "progress": False, **kwargs}
    return rank_completions(model, tokenizer, prompts, reward, **kwargs)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ------------------------------------------------------------------ rows


def test_rows_are_what_the_collator_reads(model, tokenizer):
    rows = run(model, tokenizer)
    assert [r["prompt_index"] for r in rows] == list(range(len(PROMPTS)))
    for row, prompt in zip(rows, PROMPTS, strict=True):
        assert row["prompt"] == prompt
        assert len(row["completions"]) == len(row["scores"]) == len(row["truncated"]) == 3
        assert row["scores"] == pytest.approx([len(c) for c in row["completions"]], abs=0.01)
        for text, cut in zip(row["completions"], row["truncated"], strict=True):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert all(WORDS[i] not in ("<eos>", "<pad>", "<bos>") for i in ids)  # decoded without special tokens
            assert (len(ids) == 6) if cut else (len(ids) < 6)  # cut at max_new_tokens, or ended by EOS
    assert any(any(r["truncated"]) for r in rows) and any(not all(r["truncated"]) for r in rows)
    batch = RankedPreferenceCollator(tokenizer)(rows)
    assert batch["ranks"].shape == (len(PROMPTS), 3)
    assert rows.stats.rows_written == len(PROMPTS) and rows.stats.generated_tokens > 0


def test_chat_prompts_go_through_the_chat_template(tokenizer):
    seen = []

    def generate(texts, num_samples, seed):
        seen.extend(texts)
        return [[f"a {j}" for j in range(num_samples)] for _ in texts]

    run(None, tokenizer, generate=generate)
    assert seen[1] == "<user> hey c d e <end> <assistant> "
    assert seen[0] == "hi a b"  # a text prompt is continued as it is


def test_the_reward_is_called_on_batches_in_trls_convention(model, tokenizer):
    calls = []

    def reward(prompts, completions):
        calls.append((list(prompts), list(completions)))
        return length_reward(prompts, completions)

    rows = run(model, tokenizer, reward=reward, batch_size=3)
    assert [len(p) for p, _ in calls] == [9, 9, 3]  # 7 prompts in batches of 3, 3 completions each
    prompts, completions = calls[0]
    assert prompts == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3 + [PROMPTS[2]] * 3
    assert completions[:3] == rows[0]["completions"]  # a text prompt's completions are strings
    assert completions[3:6] == [[{"role": "assistant", "content": c}] for c in rows[1]["completions"]]


def test_sampling_is_seeded_and_leaves_the_callers_generator_alone(model, tokenizer):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = run(model, tokenizer, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert run(model, tokenizer, seed=0) == a
    assert run(model, tokenizer, seed=1) != a
    assert tokenizer.padding_side == "right"  # never switched


def test_a_summary_at_the_end(model, tokenizer, tmp_path, capsys):
    rows = run(model, tokenizer, out=tmp_path / "ranked.jsonl", progress=True)
    err = capsys.readouterr().err
    assert "rank_completions: 7 rows written, 0 already there, 0 prompts skipped (all completions identical)" in err
    assert "tokens/s" in err and str(tmp_path / "ranked.jsonl") in err
    assert rows.stats.generated_tokens == sum(
        len(tokenizer(c, add_special_tokens=False)["input_ids"]) + (not cut)  # + its EOS
        for r in rows
        for c, cut in zip(r["completions"], r["truncated"], strict=True)
    )


def test_batch_seed_depends_on_seed_and_batch():
    seeds = {batch_seed(s, b) for s in range(3) for b in range(50)}
    assert len(seeds) == 150


def test_generate_callable(tokenizer):
    def generate(texts, num_samples, seed):
        assert num_samples == 3 and isinstance(seed, int)
        return [[(f"{t} {j}", j == 0) for j in range(num_samples)] if i % 2 else ["x", "y", "z"]
                for i, t in enumerate(texts)]  # fmt: skip

    rows = run(None, tokenizer, generate=generate)
    assert rows[0]["completions"] == ["x", "y", "z"] and rows[0]["truncated"] == [None] * 3
    assert rows[1]["truncated"] == [True, False, False]
    assert rows.stats.truncated == sum(1 for r in rows if r["truncated"][0])


def test_prompts_with_identical_completions_are_skipped_and_counted(tokenizer):
    def generate(texts, num_samples, seed):
        return [["same"] * num_samples if t.startswith("hello") or t.startswith("1") else ["a", "b", "c"]
                for t in texts]  # fmt: skip

    rows = run(None, tokenizer, generate=generate)
    assert [r["prompt_index"] for r in rows] == [0, 1, 3, 4, 6]
    assert rows.stats.skipped_identical == 2 and rows.stats.rows_written == 5


# ------------------------------------------------------------------ a reward model


def reward_model():
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, num_labels=1,
    )  # fmt: skip
    return transformers.LlamaForSequenceClassification(config).eval()


def test_a_reward_model_scores_the_chat_formatted_conversation_in_batches(tokenizer):
    rm = reward_model()
    prompts = ["hi a", [{"role": "user", "content": "hey"}], [{"role": "user", "content": "b c d e f g"}]]
    completions = ["a b c", [{"role": "assistant", "content": "hello !"}], "1"]
    forwards = []
    rm.register_forward_hook(lambda module, args, kwargs_out: forwards.append(1))
    scores = RewardModel(rm, tokenizer, batch_size=2)(prompts, completions)
    assert len(forwards) == 2
    conversations = [
        "<user> hi a <end> <assistant> a b c <end> ",
        "<user> hey <end> <assistant> hello ! <end> ",
        "<user> b c d e f g <end> <assistant> 1 <end> ",
    ]
    with torch.no_grad():  # each alone, unpadded
        want = [rm(**tokenizer(c, add_special_tokens=False, return_tensors="pt")).logits[0, 0] for c in conversations]
    assert scores == pytest.approx([w.item() for w in want], abs=1e-5)


def test_rank_completions_takes_a_reward_model_and_its_tokenizer(model, tokenizer):
    rm = reward_model()
    rows = run(model, tokenizer, reward=(rm, tokenizer))
    direct = RewardModel(rm, tokenizer)
    for row in rows:
        prompts = [row["prompt"]] * len(row["completions"])
        assert row["scores"] == pytest.approx(direct(prompts, row["completions"]), abs=1e-5)

    class ArmoRMLike(torch.nn.Module):  # returns .score, as ArmoRM's custom head does
        def __init__(self):
            super().__init__()
            self.rm = rm

        def forward(self, **inputs):
            return type("Out", (), {"score": 2 * self.rm(**inputs).logits})()

    doubled = run(model, tokenizer, reward=RewardModel(ArmoRMLike(), tokenizer))
    assert [r["scores"] for r in doubled] == [pytest.approx([2 * s for s in r["scores"]], abs=1e-5) for r in rows]


def test_the_cli_with_a_reward_model(model, tokenizer, tmp_path):
    rm = reward_model()
    for name, m in (("policy", model), ("rm", rm)):
        m.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in ["hi a b", "hello"]))  # bare JSON strings
    rows = main(["--model", str(tmp_path / "policy"), "--prompts", str(prompts), "--reward-model", str(tmp_path / "rm"),
                 "--num-samples", "3", "--max-new-tokens", "6", "--dtype", "float32", "--device", "cpu",
                 "--out", str(tmp_path / "ranked.jsonl")])  # fmt: skip
    assert [r["prompt"] for r in rows] == ["hi a b", "hello"]
    for row in rows:
        want = RewardModel(rm, tokenizer)([row["prompt"]] * 3, row["completions"])
        assert row["scores"] == pytest.approx(want, abs=1e-5)


def test_a_reward_model_needs_a_chat_template():
    with pytest.raises(ValueError, match="chat template"):
        RewardModel(reward_model(), make_tokenizer(chat=False))


# ------------------------------------------------------------------ resume


def failing_after(calls: int):
    """``length_reward`` that raises on its call number ``calls`` (0-based): a run stopped mid-way."""
    seen = []

    def reward(prompts, completions):
        seen.append(len(prompts))
        if len(seen) > calls:
            raise KeyboardInterrupt
        return length_reward(prompts, completions)

    return reward


def test_a_resumed_run_writes_what_an_uninterrupted_run_writes(model, tokenizer, tmp_path):
    full = run(model, tokenizer, out=tmp_path / "full.jsonl")
    assert read_jsonl(tmp_path / "full.jsonl") == list(full)
    out = tmp_path / "ranked.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(model, tokenizer, out=out, reward=failing_after(1))
    assert read_jsonl(out) == list(full)[:3]  # the first batch, kept
    # a kill mid-write leaves a torn last line: it is dropped, and the row written again whole
    with open(out, "a") as f:
        f.write(json.dumps(full[3])[:25])
    rows = run(model, tokenizer, out=out)
    assert read_jsonl(out) == list(full) == list(rows)
    assert (rows.stats.rows_resumed, rows.stats.rows_written) == (3, 4)
    again = run(model, tokenizer, out=out)  # all there: nothing sampled, nothing written
    assert read_jsonl(out) == list(full) and again.stats.rows_written == 0


def test_resume_regenerates_a_partly_written_batch_and_writes_only_its_missing_rows(model, tokenizer, tmp_path):
    full = run(model, tokenizer)
    out = tmp_path / "ranked.jsonl"
    out.write_text("".join(json.dumps(full[i]) + "\n" for i in (0, 2, 5)))  # batch 0 and 1 half done
    rows = run(model, tokenizer, out=out)
    assert list(rows) == list(full)
    assert sorted(r["prompt_index"] for r in read_jsonl(out)) == list(range(len(PROMPTS)))  # no duplicate


def test_resume_refuses_a_file_written_for_other_prompts(model, tokenizer, tmp_path):
    out = tmp_path / "ranked.jsonl"
    run(model, tokenizer, out=out)
    with pytest.raises(ValueError, match="prompt_index 0"):
        run(model, tokenizer, prompts=["c d"] + PROMPTS[1:], out=out)


def test_resume_refuses_other_arguments(model, tokenizer, tmp_path):
    out = tmp_path / "ranked.jsonl"
    run(model, tokenizer, out=out)
    with pytest.raises(ValueError, match="prompt 0 .* 3 completions, not num_samples = 4"):
        run(model, tokenizer, out=out, num_samples=4)


def test_a_killed_process_resumes_with_nothing_lost_or_duplicated(model, tokenizer, tmp_path):
    """The CLI in a real subprocess, SIGKILLed after 2 rows are written, then run again to the end."""
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    args = ["--model", str(folder), "--prompts", str(prompts), "--num-samples", "3", "--max-new-tokens", "6",
            "--batch-size", "2", "--seed", "3", "--dtype", "float32", "--device", "cpu"]  # fmt: skip
    want = main([*args, "--reward", "tests.test_generate:length_reward", "--out", str(tmp_path / "full.jsonl")])
    out = tmp_path / "ranked.jsonl"
    cmd = [sys.executable, "-m", "rcpo_losses.training.generate", *args, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([*cmd, "--reward", "tests.test_generate:slow_length_reward"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 2):
        assert child.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed = read_jsonl(out)
    assert 2 <= len(killed) < len(want)
    done = subprocess.run([*cmd, "--reward", "tests.test_generate:length_reward"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert read_jsonl(out) == list(want)
    assert f"{len(want) - len(killed)} rows written, {len(killed)} already there" in done.stderr


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("reward", "error", "match"),
    [
        (lambda p, c: [math.nan] * len(c), ValueError, r"prompt 3 \('a b c d e f g'\): completion 0 scored nan"),
        (lambda p, c: [0.0, math.inf] + [0.0] * (len(c) - 2), ValueError, r"prompt 3 .*completion 1 scored inf"),
        (
            lambda p, c: [0.0] * (len(c) - 1),
            ValueError,
            r"8 scores for 9 completions, batch prompt 3 \('a b c d e f g'\) \.\. prompt 5",
        ),
        (lambda p, c: 1 / 0 if "1 2 3" in p else [0.0] * len(c), RuntimeError, r"prompt 5 \('1 2 3'\).*ZeroDivision"),
    ],
    ids=["nan", "inf", "count", "raises"],
)
def test_a_bad_reward_names_the_prompt_and_keeps_the_rows_written(model, tokenizer, tmp_path, reward, error, match):
    out = tmp_path / "ranked.jsonl"
    calls = []

    def first_batch_fine(prompts, completions):
        calls.append(1)
        return length_reward(prompts, completions) if len(calls) == 1 else reward(prompts, completions)

    with pytest.raises(error, match=match):
        run(model, tokenizer, reward=first_batch_fine, out=out)
    assert [r["prompt_index"] for r in read_jsonl(out)] == [0, 1, 2]


def test_chat_prompts_need_a_chat_template(model):
    with pytest.raises(ValueError, match=r"prompt 1 \('hey c d e'\).*no chat template"):
        run(model, make_tokenizer(chat=False))


def test_bad_arguments():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="num_samples"):
        run(None, tok, num_samples=1)
    with pytest.raises(ValueError, match="temperature"):
        run(None, tok, temperature=0.0)
    with pytest.raises(TypeError, match="prompt 0"):
        run(None, tok, prompts=[3])
    with pytest.raises(TypeError, match="reward"):
        run(None, tok, reward="length")

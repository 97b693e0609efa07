"""rcpo_losses.training.generate: sample, score, rank (tiny in-process models; the real model: test_real_model.py)."""

from __future__ import annotations

import copy
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

from rcpo_losses.training.data import RankedPreferenceCollator, encode_prompt  # noqa: E402
from rcpo_losses.training.generate import (  # noqa: E402
    RewardModel,
    Sample,
    _read_prompts,
    batch_seed,
    main,
    rank_completions,
    rank_samples,
)

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
        assert row["prompt_ids"] == encode_prompt(tokenizer, prompt)[1]  # the tokens the model continued
        assert len(set(row["completions"])) == len(row["completions"]) and sum(row["samples"]) == 3
        for text, cut, ids in zip(row["completions"], row["truncated"], row["completion_ids"], strict=True):
            words = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert all(WORDS[i] not in ("<eos>", "<pad>", "<bos>") for i in words)  # decoded without special tokens
            assert tokenizer.decode(ids, skip_special_tokens=True) == text
            # cut at max_new_tokens with no end token, or ended by the EOS the model sampled, which is kept
            assert (len(ids) == 6 and 2 not in ids) if cut else (ids[-1] == 2 and ids.count(2) == 1 and len(ids) <= 6)
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

    def reward(prompts, completions, completion_ids, **kwargs):
        calls.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs})
        return length_reward(prompts, completions)

    items = [{"prompt": p, "topic": f"t{i}", "level": i} for i, p in enumerate(PROMPTS)]
    items[2] = {"prompt": PROMPTS[2]}  # a row without the other columns: None for them
    rows = run(model, tokenizer, prompts=items, reward=reward, batch_size=3)
    sizes = [len(r["completions"]) for r in rows]
    assert [len(c["prompts"]) for c in calls] == [sum(sizes[:3]), sum(sizes[3:6]), sizes[6]]  # batches of 3
    call = calls[0]
    assert set(call) == {"prompts", "completions", "completion_ids", "topic", "level"}
    n0, n1 = sizes[0], sizes[1]
    assert call["prompts"] == [PROMPTS[0]] * n0 + [PROMPTS[1]] * n1 + [PROMPTS[2]] * sizes[2]
    assert call["completions"][:n0] == rows[0]["completions"]  # a text prompt's completions are strings
    assert call["completions"][n0 : n0 + n1] == [[{"role": "assistant", "content": c}] for c in rows[1]["completions"]]
    assert call["completion_ids"][:n0] == rows[0]["completion_ids"]
    assert call["topic"] == ["t0"] * n0 + ["t1"] * n1 + [None] * sizes[2]
    assert call["level"][:n0] == [0] * n0
    assert rows[0]["topic"] == "t0" and rows[1]["level"] == 1 and "topic" not in rows[2]  # the columns, kept


def test_a_reward_without_kwargs_gets_the_keywords_it_names(tokenizer):
    def generate(texts, num_samples, seed):
        return [[f"a {'b ' * j}" for j in range(num_samples)] for _ in texts]

    seen = []

    def reward(completions, prompts, level):  # any order: called by keyword
        seen.append(level)
        return [float(len(c)) for c in completions]

    run(None, tokenizer, prompts=[{"prompt": "hi", "level": 3}], reward=reward, generate=generate)
    assert seen == [[3, 3, 3]]
    with pytest.raises(TypeError, match="reward: takes no keyword 'prompts'"):
        run(None, tokenizer, reward=lambda p, c: [0.0] * len(c), generate=generate)


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
    assert "rank_completions: 7 rows written, 0 already there, 0 samples merged into an identical one, " in err
    assert "0 prompts skipped (one distinct completion), 0 prompts skipped (ties leave nothing to rank)" in err
    assert "tokens/s" in err and str(tmp_path / "ranked.jsonl") in err
    assert rows.stats.generated_tokens == sum(
        len(ids) * n for r in rows for ids, n in zip(r["completion_ids"], r["samples"], strict=True)
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
    assert "completion_ids" not in rows[0] and "prompt_ids" not in rows[0]  # the collator tokenizes their text


def test_prompts_with_identical_completions_are_skipped_and_counted(tokenizer):
    def generate(texts, num_samples, seed):
        return [["same"] * num_samples if t.startswith("hello") or t.startswith("1") else ["a", "b", "c"]
                for t in texts]  # fmt: skip

    rows = run(None, tokenizer, generate=generate)
    assert [r["prompt_index"] for r in rows] == [0, 1, 3, 4, 6]
    assert rows.stats.skipped_identical == 2 and rows.stats.rows_written == 5 and rows.stats.merged == 4


# ------------------------------------------------------------------ a reward model


def reward_model(**config):
    torch.manual_seed(1)
    config = transformers.LlamaConfig(**{
        "vocab_size": len(WORDS), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "pad_token_id": 0,
        "num_labels": 1, **config,
    })  # fmt: skip
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

        def get_input_embeddings(self):
            return self.rm.get_input_embeddings()

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
    full = run(model, tokenizer, out=tmp_path / "full.jsonl")
    out = tmp_path / "ranked.jsonl"
    (tmp_path / "ranked.jsonl.meta.json").write_bytes((tmp_path / "full.jsonl.meta.json").read_bytes())
    out.write_text("".join(json.dumps(full[i]) + "\n" for i in (0, 2, 5)))  # batch 0 and 1 half done
    rows = run(model, tokenizer, out=out)
    assert list(rows) == list(full)
    assert sorted(r["prompt_index"] for r in read_jsonl(out)) == list(range(len(PROMPTS)))  # no duplicate


def test_resume_refuses_a_file_written_for_other_prompts(model, tokenizer, tmp_path):
    out = tmp_path / "ranked.jsonl"
    run(model, tokenizer, out=out)
    with pytest.raises(ValueError, match="line 1 of .* a row for prompt_index 0 that is not that prompt"):
        run(model, tokenizer, prompts=["c d"] + PROMPTS[1:], out=out)
    old = tmp_path / "old.jsonl"  # rows without the record of their arguments (an older rank_completions)
    old.write_text(out.read_text())
    with pytest.raises(ValueError, match="old.jsonl holds rows but no old.jsonl.meta.json"):
        run(model, tokenizer, out=old)


@pytest.mark.parametrize(
    "change",
    [{"num_samples": 4}, {"max_new_tokens": 5}, {"temperature": 0.7}, {"top_p": 0.9}, {"batch_size": 2}, {"seed": 1},
     {"model": "other"}, {"generate": "other"}],
)  # fmt: skip
def test_resume_refuses_other_arguments_and_touches_nothing(model, tokenizer, tmp_path, change):
    out = tmp_path / "ranked.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(model, tokenizer, out=out, reward=failing_after(1))
    with open(out, "a") as f:
        f.write('{"prompt": "torn')  # a torn last line: cut only once the file is accepted
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    name, policy = next(iter(change)), model
    if name == "model":  # another checkpoint
        change, policy = {}, make_model(seed=1)
    elif name == "generate":
        change, name = {"generate": lambda texts, n, seed: [["a", "b", "c"] for _ in texts]}, "sampler"
    with pytest.raises(ValueError, match=rf"out: .*ranked.jsonl was sampled with {name} = .*, not "):
        run(policy, tokenizer, out=out, **change)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    if name == "num_samples":  # the same arguments: accepted, the torn line cut, the rest sampled
        rows = run(model, tokenizer, out=out)
        assert rows == run(model, tokenizer) and read_jsonl(out) == list(rows)


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


REFUSING = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
    "<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_samples": 1}, ValueError, "num_samples: expected an int >= 2"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"seed": -1}, ValueError, "seed: expected an int >= 0, got -1"),
        ({"seed": 1.5}, ValueError, "seed: expected an int"),
        ({"prompts": [3]}, TypeError, r"prompts: prompt 0 \('3'\) is a int"),
        ({"prompts": ["hi", ""]}, ValueError, r"prompts: prompt 1 \(''\): the prompt is empty"),
        ({"prompts": ["hi", []]}, ValueError, r"prompts: prompt 1 \(''\): has no messages"),
        ({"prompts": PROMPTS, "tokenizer": "refusing"}, ValueError,
         r"prompts: prompt 4 \('be brief hi !'\): the tokenizer's chat template refuses it: no system messages"),
        ({"prompts": [{"prompt": "hi", "scores": 1}]}, ValueError, r"prompt 0 \('hi'\) has a column 'scores'"),
        ({"prompts": [{"text": "hi"}]}, ValueError, "prompts: item 0 is a dict without a 'prompt' key"),
        ({"prompts": [{"prompt": "hi", "when": object()}]}, ValueError, "prompt 0 .* cannot be written to out as JSON"),
        ({"reward": "length"}, TypeError, "reward: expected a function"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named_before_out_is_touched(model, tmp_path, kwargs, error, match):
    tok = make_tokenizer()
    if kwargs.get("tokenizer") == "refusing":
        tok.chat_template = REFUSING
        kwargs = {k: v for k, v in kwargs.items() if k != "tokenizer"}
    out = tmp_path / "ranked.jsonl"
    with pytest.raises(error, match=match):
        run(model, tok, out=out, **kwargs)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ out: read-only, locked


def test_a_complete_file_is_read_without_being_opened_for_writing(model, tokenizer, tmp_path, monkeypatch):
    import builtins
    import io

    out = tmp_path / "ranked.jsonl"
    rows = run(model, tokenizer, out=out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_open = builtins.open

    def read_only(file, mode="r", *args, **kwargs):  # a read-only folder, for root too
        if str(file).startswith(str(tmp_path)) and any(c in mode for c in "wax+"):
            raise PermissionError(f"read-only: {file}")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    monkeypatch.setattr(io, "open", read_only)
    monkeypatch.setattr(os, "replace", lambda *a: pytest.fail("os.replace on a complete file"))
    again = run(model, tokenizer, out=out)
    assert again == rows and again.stats.rows_resumed == len(rows) and again.stats.rows_written == 0
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_second_writer_is_refused(model, tokenizer, tmp_path):
    import fcntl

    out = tmp_path / "ranked.jsonl"
    with open(f"{out}.lock", "a") as held:  # another process writing it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match="another process is writing .*ranked.jsonl"):
            run(model, tokenizer, out=out)
    assert not out.exists()
    assert run(model, tokenizer, out=out) == run(model, tokenizer)  # the lock released: the next run writes


def test_prompts_without_a_row_are_recorded_and_not_sampled_again(tokenizer, tmp_path):
    calls = []

    def generate(texts, num_samples, seed):
        calls.append(len(texts))
        return [["same"] * num_samples if t.startswith("hello") else ["a", "b", "c"] for t in texts]

    out = tmp_path / "ranked.jsonl"
    first = run(None, tokenizer, generate=generate, out=out)
    assert first.stats.skipped_identical == 1 and len(calls) == 3
    meta = json.loads((tmp_path / "ranked.jsonl.meta.json").read_text())
    assert meta["skipped"] == {"identical": [2], "tied": []}
    assert meta["arguments"]["sampler"].endswith("generate") and meta["arguments"]["seed"] == 0
    again = run(None, tokenizer, generate=generate, out=out)
    assert len(calls) == 3 and again == first and again.stats.skipped_identical == 1  # nothing sampled again


# ------------------------------------------------------------------ identical samples and ties


def test_identical_samples_are_one_response_and_ties_follow_the_collators_rule(tokenizer):
    samples = [
        [Sample("a b", (13, 14, 2), False), Sample("a", (13, 2), False), Sample("a b", (13, 14, 2), False)],
        [Sample("c", (15,), True), Sample("c", (15,), True), Sample("c", (15,), True)],
        [Sample("a", (13,), True), Sample("b", (14,), True), Sample("c", (15,), True)],
        [Sample("a", (13,), True), Sample("b b", (14, 14), True), Sample("c", (15,), True)],
    ]
    seen = []

    def reward(prompts, completions, completion_ids, **kwargs):
        seen.append(completion_ids)
        return [float(len(c) > 1) for c in completions]  # "a", "b", "c" tie at 0

    out = rank_samples(["hi", "hey", "hello", "hi a"], samples, reward, prompt_ids=[[1, 10], [1, 12], [1, 11], None])
    assert out.skipped == [None, "identical", "tied", None] and out.merged == [1, 2, 0, 0]
    assert seen == [[[13, 14, 2], [13, 2], [13], [14], [15], [13], [14, 14], [15]]]  # once each distinct text
    assert out.rows[0] == {"prompt": "hi", "completions": ["a b", "a"], "completion_ids": [[13, 14, 2], [13, 2]],
                           "truncated": [False, False], "scores": [1.0, 0.0], "samples": [2, 1],
                           "prompt_ids": [1, 10]}  # fmt: skip
    assert out.rows[3]["scores"] == [0.0, 1.0, 0.0] and "prompt_ids" not in out.rows[3]
    batch = RankedPreferenceCollator(tokenizer)([out.rows[0], out.rows[3]])  # the default rule: no error
    assert batch["ranks"].tolist() == [[0, 1, -100], [-1, 0, -1]]


def test_rank_completions_to_rcpo_trainer_with_every_default(fused_rows, tmp_path):
    """Ties and identical samples (a reward of few values): the default path trains, on the sampled ids."""
    datasets = pytest.importorskip("datasets")
    from rcpo_losses.training.trainer import RCPOTrainer

    tok, model, rows = fused_rows
    model = copy.deepcopy(model)
    stats = rows.stats
    assert stats.merged > 0 and stats.skipped_tied + stats.skipped_identical > 0 and len(rows) >= 2
    assert any(len(set(r["scores"])) < len(r["scores"]) for r in rows)  # a tie the default collator once refused
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2,
                                          save_strategy="no", per_device_train_batch_size=2)  # fmt: skip
    trainer = RCPOTrainer(model, args=args, train_dataset=datasets.Dataset.from_list(list(rows)),
                          processing_class=tok)  # fmt: skip
    want = RankedPreferenceCollator(tok)(list(rows))["token_hash"].tolist()
    found = [h for batch in trainer.get_train_dataloader() for h in batch["token_hash"].tolist()]
    assert sorted(found) == sorted(want)  # the Dataset kept completion_ids, truncated and prompt_ids
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


# ------------------------------------------------------------------ the sampled tokens, exactly

FUSED = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "b", "c", " ", "ab", "ba"]


def fused_tokenizer():
    """BPE whose decoder joins tokens with nothing: sampled ``a``, ``b`` decode to ``ab``, which is one token."""
    from tokenizers import Tokenizer, decoders, models, processors

    tok = Tokenizer(models.BPE({w: i for i, w in enumerate(FUSED)}, [("a", "b"), ("b", "a")], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def fused_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(FUSED), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    head = torch.nn.Linear(16, len(FUSED), bias=True)  # no <pad>, <bos>, <unk>; "a" and "b" often; EOS at times
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[[0, 1, 3]] = -1e4
        head.bias[[4, 5]] = 3.0
        head.bias[2] = 1.5
    model.lm_head = head
    return model


def count_a(prompts, completions, **kwargs):
    """A reward of few values: ties and identical samples are common."""
    return [float(c.count("a")) for c in completions]


@pytest.fixture(scope="module")
def fused_rows():
    tok, model = fused_tokenizer(), fused_model()
    rows = rank_completions(model, tok, ["ab c", "c", "b a", "a", "cc", "ba"], count_a, num_samples=4,
                            max_new_tokens=3, temperature=1.0, batch_size=3, seed=1, progress=False)  # fmt: skip
    return tok, model, rows


def test_a_cut_completions_statistics_cover_exactly_its_sampled_tokens(fused_rows):
    from rcpo_losses.training.model_stats import response_stats

    tok, model, rows = fused_rows
    pairs = [(ids, cut) for r in rows for ids, cut in zip(r["completion_ids"], r["truncated"], strict=True)]
    retokenized = [tok(tok.decode(ids, skip_special_tokens=True), add_special_tokens=False)["input_ids"]
                   for ids, _ in pairs]  # fmt: skip
    assert any(new != [t for t in ids if t != 2] for new, (ids, _) in zip(retokenized, pairs, strict=True))
    assert any(cut and 2 not in ids for ids, cut in pairs) and any(not cut for _, cut in pairs)
    for layout in ("padded", "prefix_shared"):
        batch = RankedPreferenceCollator(tok, layout=layout)(list(rows))
        with torch.no_grad():
            stats = response_stats(model, batch, fused_linear=layout == "padded")
        for b, row in enumerate(rows):
            for j, ids in enumerate(row["completion_ids"]):
                if batch["ranks"][b, j] == -100:
                    continue
                seq = torch.tensor([row["prompt_ids"] + ids])
                with torch.no_grad():
                    logps = model(seq).logits[0, :-1].double().log_softmax(-1).gather(-1, seq[0, 1:, None])[:, 0]
                want = logps[len(row["prompt_ids"]) - 1 :].sum().item()  # exactly the sampled ids, no end added
                assert stats.lengths[b, j].item() == len(ids)
                assert stats.logps[b, j].item() == pytest.approx(want, abs=1e-4)


# ------------------------------------------------------------------ sampling is what the docs say


def test_the_models_generation_config_does_not_change_the_sampling(tokenizer, caplog):
    plain = run(make_model(), tokenizer, prompts=PROMPTS[:3])
    model = make_model()
    own = model.generation_config
    own.repetition_penalty, own.min_new_tokens, own.no_repeat_ngram_size, own.top_k = 5.0, 6, 1, 2
    with caplog.at_level("WARNING", logger="rcpo_losses.training.generate"):
        assert run(model, tokenizer, prompts=PROMPTS[:3]) == plain
    assert "leaves out the model's generation_config settings" in caplog.text
    assert all(name in caplog.text for name in ("repetition_penalty", "min_new_tokens", "no_repeat_ngram_size"))
    assert model.generation_config is own and own.min_new_tokens == 6  # restored


# ------------------------------------------------------------------ RewardModel: eval, last token, truncation


def independent_scores(rm, tokenizer, conversations, label=0):
    """Each conversation (text or ids) alone through the base model, the head at its last token: no padding."""
    out = []
    with torch.no_grad():
        for c in conversations:
            ids = torch.tensor([c if isinstance(c, list) else tokenizer(c, add_special_tokens=False)["input_ids"]])
            out.append(rm.score(rm.model(input_ids=ids).last_hidden_state[0, -1])[label].item())
    return out


CONVERSATIONS = [
    "<user> hi a <end> <assistant> a b c <end> ",
    "<user> hey <end> <assistant> hello ! <end> ",
    "<user> b c d e f g <end> <assistant> 1 <end> ",
]
PAIRS = (["hi a", [{"role": "user", "content": "hey"}], [{"role": "user", "content": "b c d e f g"}]],
         ["a b c", [{"role": "assistant", "content": "hello !"}], "1"])  # fmt: skip


def test_a_reward_model_scores_in_eval_mode_and_restores_the_mode(tokenizer):
    rm = reward_model(attention_dropout=0.5).train()
    scores = RewardModel(rm, tokenizer, batch_size=2)(*PAIRS)
    assert rm.training and all(m.training for m in rm.modules())
    rm.eval()
    assert scores == pytest.approx(independent_scores(rm, tokenizer, CONVERSATIONS), abs=1e-5)


def test_a_reward_model_reads_the_last_real_token_whatever_the_pad_ids(tokenizer):
    rm = reward_model()
    rm.config.pad_token_id = WORDS.index("end")  # every conversation ends with it; the tokenizer pads with <pad>
    scores = RewardModel(rm, tokenizer, batch_size=3)(*PAIRS)
    assert scores == pytest.approx(independent_scores(rm, tokenizer, CONVERSATIONS), abs=1e-5)


def test_a_reward_model_cuts_the_prompt_never_the_completion(tokenizer):
    rm = reward_model()

    def enc(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    short = enc("<user> hi <end> <assistant> 1 <end> ")
    head, rest = enc("<user> b c d e f g <end> <assistant> "), enc("1 <end> ")
    scores = RewardModel(rm, tokenizer, max_length=len(short))(["hi", "b c d e f g"], ["1", "1"])
    kept = [short, head[-(len(short) - len(rest)) :] + rest]  # the long one loses the start of its prompt
    assert scores == pytest.approx(independent_scores(rm, tokenizer, kept), abs=1e-5)
    with pytest.raises(ValueError, match=rf"the completion of pair 0 has {len(rest)} tokens .* never cut"):
        RewardModel(rm, tokenizer, max_length=len(rest))(["hi"], ["1"])


def test_a_classifier_with_several_labels_needs_label(tokenizer):
    rm = reward_model(num_labels=3)
    with pytest.raises(ValueError, match="num_labels = 3 logits; pass label="):
        RewardModel(rm, tokenizer)
    with pytest.raises(ValueError, match="label: 3 is not a logit"):
        RewardModel(rm, tokenizer, label=3)
    scores = RewardModel(rm, tokenizer, label=2)(*PAIRS)
    assert scores == pytest.approx(independent_scores(rm, tokenizer, CONVERSATIONS, label=2), abs=1e-5)


# ------------------------------------------------------------------ the CLI's prompts file


def topic_reward(prompts, completions, topic, **kwargs):
    return [len(c) + (t == "long") * 1e-3 * j for j, (c, t) in enumerate(zip(completions, topic, strict=True))]


def test_the_cli_keeps_the_prompt_rows_columns(model, tokenizer, tmp_path):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi a b", "topic": "long"}) + "\n" + json.dumps("hello") + "\n")
    rows = main(["--model", str(folder), "--prompts", str(prompts), "--reward", "tests.test_generate:topic_reward",
                 "--num-samples", "3", "--max-new-tokens", "6", "--dtype", "float32", "--device", "cpu",
                 "--out", str(tmp_path / "ranked.jsonl")])  # fmt: skip
    assert rows[0]["topic"] == "long" and "topic" not in rows[1]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"prompt": "caf\xc3\xa9"}\n"ok"\n{"prompt": "x"\n', r"line 3 of .*prompts.jsonl is not JSON"),
        (b'{"prompt": "caf\xc3\xa9"}\n"caf\xe9"\n', r"line 2 of .*prompts.jsonl is not UTF-8"),
        (b'"a"\n\n{"text": "b"}\n', r"line 3 of .*prompts.jsonl has no 'prompt' key"),
        (b'"a"\n[1, 2]\n', r"line 2 of .*prompts.jsonl is a JSON list"),
    ],
)
def test_a_bad_prompts_line_is_named_by_file_and_line(tmp_path, content, match):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        _read_prompts(str(path))


def test_prompts_are_read_as_utf8_whatever_the_locale(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes('{"prompt": "café ✓", "topic": "été"}\n"naïve"\n'.encode())
    code = f"from rcpo_losses.training.generate import _read_prompts; print(ascii(_read_prompts({str(path)!r})))"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert eval(done.stdout) == [{"prompt": "café ✓", "topic": "été"}, "naïve"]

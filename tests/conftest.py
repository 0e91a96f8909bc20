"""Shared fixtures: tiny real models and tokenizers built on the spot (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"-+=*/()[]{}<>_\n")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]


def build_tokenizer(out_dir: Path):
    """A character-level fast tokenizer with a ChatML chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML
    tok.save_pretrained(out_dir)
    return tok


def build_model(out_dir: Path, vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 0, eos=None):
    """A tiny random Llama-architecture causal LM saved as a real model folder.

    Llama, not Qwen2: transformers 5 loads the tokenizer of a folder whose config says qwen2 as
    Qwen2Tokenizer, which replaces our character pre-tokenizer with byte-level BPE rules.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=eos,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder with a tiny Llama model (hidden 64, 2 layers; bitsandbytes CPU 4-bit needs in_features >= 64) + char tokenizer with ChatML."""
    d = tmp_path_factory.mktemp("tiny-model")
    tok = build_tokenizer(d)
    build_model(d, vocab_size=len(tok), eos=tok.convert_tokens_to_ids("<|im_end|>"))
    return d


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    rows = [
        {"prompt": f"reverse {w}", "demonstration": w[::-1], "answer": w[::-1]}
        for w in ["abc", "hello", "cat", "dog", "tree", "moon", "star", "sky"]
    ]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def tiny_recipe(model_dir: Path, data: Path, out_dir: Path, **sections) -> dict:
    """A recipe dict for a few fast CPU steps; `sections` override whole keys, e.g. teacher={'kind': 'base'}."""
    recipe = {
        "model": {
            "name": str(model_dir),
            "backend": "hf",
            "load_in_4bit": False,
            "max_seq_length": 512,
            "lora": {"r": 4, "alpha": 8},
        },
        "data": {"source": str(data), "max_prompt_tokens": 64, "max_teacher_prompt_tokens": 256},
        "generation": {"max_new_tokens": 12},
        "train": {
            "max_steps": 3,
            "batch_size": 2,
            "learning_rate": 1e-2,
            "save_steps": 2,
            "sample_steps": 1,
            "gradient_checkpointing": False,
        },
        "output": {"dir": str(out_dir), "name": "run"},
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    return recipe

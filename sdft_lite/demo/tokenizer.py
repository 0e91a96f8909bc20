"""A character-level tokenizer with a ChatML chat template, built with `tokenizers`.

One token per character keeps the demo model tiny (vocabulary ~100) and makes every
tokenization compositional: tokenizing `a + b` gives the tokens of `a` then those of `b`,
which is what SDFT's "reuse the student's completion ids verbatim" rule relies on anyway.
"""

from __future__ import annotations

import string
from pathlib import Path

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# A dedicated unknown token, so characters outside the alphabet (accents, emoji) become
# one visible token instead of being dropped silently.
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, UNK_TOKEN]  # ids 0, 1, 2, 3

# Newline, space, then printable ASCII without whitespace: letters, digits, punctuation.
ALPHABET = "\n " + "".join(c for c in string.printable if not c.isspace())

# ChatML, as Qwen2.5 writes it but without a default system message. The
# `{% generation %}` block marks assistant tokens so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` works for SFT baselines.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer():
    """Return a `PreTrainedTokenizerFast` with one token per character of `ALPHABET`."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(ALPHABET)})
    # BPE with no merges and no pre-tokenizer splits any text into single characters;
    # Fuse() decodes by plain concatenation (no spaces inserted between tokens).
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tokenizer(out_dir: str | Path):
    """Build the tokenizer and save it so `AutoTokenizer.from_pretrained(out_dir)` loads it."""
    tok = build_tokenizer()
    tok.save_pretrained(str(out_dir))
    return tok

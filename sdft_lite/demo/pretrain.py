"""Pretrain the tiny demo model from synthetic chat data, deterministically.

The corpus has three streams (see `tasks.py`):
- plain prompts for the prior skills (copy, reverse, upper, add);
- the same prior skills in the paper's teacher format, with the answer as demonstration;
- teacher-format examples of unseen tasks whose answer is arbitrary, so the model learns
  that a demonstration in the prompt should be copied, whatever the instruction says.
The new skill (say a word twice) never appears, in either format.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

from . import tasks
from .tokenizer import IM_END, PAD_TOKEN, build_tokenizer

logger = logging.getLogger(__name__)

# Llama, not Qwen2: transformers 5.17 loads any `model_type: qwen2` folder with
# Qwen2Tokenizer (byte-level pre-tokenizer), whatever tokenizer_config.json says, which
# would silently drop spaces from this character tokenizer. Llama folders keep ours.
# Small enough for a 2-core CPU and a <10 MB committed folder. Measured: 2 layers had not
# learned to copy the demonstration out of the teacher prompt after 800 steps; 3 layers
# did by ~600, and the narrow MLP (256) learned as fast per step as 512 at ~60% of the cost.
# Two KV heads so the demo exercises grouped-query attention.
MODEL_KWARGS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    # 0.08 ~ 1/sqrt(hidden) instead of the usual 0.02: with 0.02 the attention logits start
    # near zero and in-context copying only emerges after thousands of steps (measured:
    # plain copy loss 1.2 vs 0.13 after 250 steps).
    initializer_range=0.08,
)
PLAIN_BATCH = 48  # short rows (~45 tokens)
TEACHER_BATCH = 32  # long rows (~200 tokens)
# Share of teacher rows that are unseen tasks: only these force copying the demonstration
# (prior skills can be answered without reading it), and copying is the slow part to learn.
OTHER_FRACTION = 0.75
LR = 2e-3
WARMUP = 50


def encode(tok, user_text: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids and labels for one chat example; loss only on the answer and <|im_end|>."""
    messages = [{"role": "user", "content": user_text}]
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    completion_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(IM_END)]
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def collate(tok, rows: list[tuple[list[int], list[int]]]):
    """Right-pad a list of (ids, labels) into tensors."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class CorpusSampler:
    """Draws pretraining batches from a seeded RNG, never using a held-out prompt."""

    def __init__(self, tok, seed: int, held_out: set[str]):
        self.tok = tok
        self.rng = random.Random(seed)
        self.held_out = held_out
        self.skills = list(tasks.PRIOR_SKILLS.values())

    def _prior_row(self) -> dict:
        while True:
            row = self.rng.choice(self.skills).example(self.rng)
            if row["prompt"] not in self.held_out:
                return row

    def plain_batch(self):
        rows = [self._prior_row() for _ in range(PLAIN_BATCH)]
        return collate(self.tok, [encode(self.tok, r["prompt"], r["answer"]) for r in rows])

    def teacher_batch(self):
        rows = [self._prior_row() for _ in range(round(TEACHER_BATCH * (1 - OTHER_FRACTION)))]
        rows += [tasks.other_task_example(self.rng) for _ in range(TEACHER_BATCH - len(rows))]
        encoded = [encode(self.tok, tasks.teacher_prompt(r), r["answer"]) for r in rows]
        return collate(self.tok, encoded)


def make_model(tok, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        bos_token_id=None,
        **MODEL_KWARGS,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, steps: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, sampler: CorpusSampler, steps: int) -> float:
    """Run `steps` AdamW steps, each on one plain and one teacher-format batch; return last loss."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    start, running = time.time(), None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        # Two passes instead of one mixed batch: padding short rows to ~200 tokens would
        # triple the cost of the plain stream.
        plain = model(**sampler.plain_batch()).loss
        teacher = model(**sampler.teacher_batch()).loss
        (plain + teacher).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses = torch.tensor([plain.item(), teacher.item()])
        running = losses if running is None else 0.9 * running + 0.1 * losses
        if step % 50 == 0 or step == steps - 1:
            logger.info(
                "step %d/%d loss plain %.3f teacher %.3f (%.0fs)",
                step,
                steps,
                *running.tolist(),
                time.time() - start,
            )
    model.eval()
    return running.sum().item()


def save(model, tok, out_dir: Path) -> None:
    """Write weights (safetensors), config, generation config and tokenizer to `out_dir`."""
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    eos_ids = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(PAD_TOKEN)]
    # Both end-of-turn tokens stop generation, as in Qwen2.5's generation_config.json.
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tok.pad_token_id, bos_token_id=None, max_new_tokens=32
    )
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def pretrain(out_dir: str | Path, held_out: set[str], seed: int = 0, steps: int = 800) -> Path:
    """Build tokenizer and model, pretrain on the synthetic corpus, save to `out_dir`."""
    import torch

    # One thread: CPU matmul reductions can depend on the thread count, so this makes the
    # result independent of the machine's cores (measured: 1 thread reproduces bit for bit,
    # 2 threads give other weights); on a shared 2-core box it is also faster.
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        tok = build_tokenizer()
        model = make_model(tok, seed)
        logger.info("demo model: %d parameters", sum(p.numel() for p in model.parameters()))
        start = time.time()
        final_loss = train(model, CorpusSampler(tok, seed, held_out), steps)
        logger.info("pretraining took %.0fs, final loss %.4f", time.time() - start, final_loss)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    save(model, tok, Path(out_dir))
    return Path(out_dir)

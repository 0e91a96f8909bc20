"""Student rollouts and the sequence layout both sides are scored on.

Layout of every scored sequence: [left-padded prompt | completion, right-padded]. The prompt
differs between student and teacher (and so does its width), the completion ids are the same
tensor for both, so completion token t sits at column P + t on each side and is predicted by the
hidden state at column P + t - 1. Masks come from lengths, never from `ids != pad` (pad may
equal eos).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .config import GenerationConfig


@dataclass
class Rollout:
    completion_ids: torch.Tensor  # [B, T] right-padded
    completion_mask: torch.Tensor  # [B, T] 1 up to and including the first EOS
    lengths: torch.Tensor  # [B]
    clipped: torch.Tensor  # [B] bool: hit max_new_tokens without EOS
    logprobs: torch.Tensor | None = None  # [B, T] log-prob of each token under the sampling distribution


def completion_lengths(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Length up to and including the first EOS of the EOS set; rows without EOS keep all T tokens."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    T = completion_ids.shape[1]
    has_eos = is_eos.any(dim=1)
    first = torch.where(
        has_eos, is_eos.float().argmax(dim=1), torch.full_like(has_eos, T - 1, dtype=torch.long)
    )
    return first + 1, ~has_eos


def mask_from_lengths(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).long()


class _SampledLogprobs:
    """Logits processor placed last: records log p(sampled token) under the final warped scores.

    Scores of step t are kept until step t+1 reveals which token was sampled, so it holds one
    [B, V] tensor at a time instead of the [B, T, V] that `output_scores` would keep.
    """

    def __init__(self):
        self.prev: torch.Tensor | None = None
        self.out: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._collect(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _collect(self, tokens: torch.Tensor) -> None:
        if self.prev is not None:
            self.out.append(self.prev.gather(1, tokens[:, None]).squeeze(1))
            self.prev = None

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self._collect(last_tokens)
        return torch.stack(self.out, dim=1)


def generate_kwargs(cfg: GenerationConfig, greedy: bool, eos_ids: list[int], pad_id: int) -> dict:
    """Every decoding argument of `generate`, from the recipe alone (used inside `_recipe_only`).

    The sampling warpers (temperature, top-k, top-p) are not among them: `_hf_generate` runs them
    as logits processors of its own, so that the recorded log-probs are those of the warped
    distribution. Every other processor is off: no repetition penalty, no n-gram ban, one beam.
    Keyword arguments, not a GenerationConfig: Unsloth's generate sets `pad_token_id` (to the
    model's EOS) unless it is one of them.
    """
    # Sampling flags are only accepted with do_sample (validate() rejects top_k with greedy);
    # greedy leaves them unset, which inside `_recipe_only` means generate's neutral defaults.
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
    return dict(
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=0,
        do_sample=not greedy,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
        **({} if greedy else sampling),
    )


def recipe_warpers(cfg: GenerationConfig) -> list:
    """Temperature, then top-k, then top-p: transformers' own warpers, in generate's order."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = []
    if cfg.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    return warpers


@contextlib.contextmanager
def _recipe_only(model):
    """`generate` fills every field its generation_config leaves unset from the model's own,
    read from the checkpoint's generation_config.json (Qwen2.5's instruct models ship
    repetition_penalty 1.1, top_k 20, top_p 0.8, temperature 0.7; others bad_words_ids,
    suppress_tokens, stop_strings, ... that have no neutral value to override them with).
    For the call, the model's own is a blank one, so only the recipe decides."""
    from transformers import GenerationConfig as HFGenerationConfig

    from .models import causal_lm

    lm = causal_lm(model)  # where generate reads it (PeftModel.generate copies it from there)
    saved = lm.generation_config
    lm.generation_config = HFGenerationConfig()
    try:
        yield
    finally:
        lm.generation_config = saved


@torch.no_grad()
def generate_rollouts(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cfg: GenerationConfig,
    eos_ids: list[int],
    pad_id: int,
    record_logprobs: bool = False,
    greedy: bool = False,
    num_samples: int = 1,
) -> Rollout:
    """Sample `num_samples` completions per row of the left-padded prompts (rows grouped per prompt)."""
    from .backends import backend_of, rollout_context

    # Unsloth: its fast-inference mode for the call (training mode and checkpointing restored
    # after) and its own fast generate; its decode path keeps its own KV cache format.
    with rollout_context(model):
        completion, logprobs = _sample(
            model,
            prompt_ids,
            prompt_mask,
            cfg,
            eos_ids,
            pad_id,
            record_logprobs,
            greedy,
            num_samples,
            engine="generate" if backend_of(model) == "unsloth" else cfg.engine,
        )
    if completion.shape[1] == 0:  # nothing generated at all (degenerate max_new_tokens)
        completion = torch.full((completion.shape[0], 1), pad_id, dtype=torch.long, device=prompt_ids.device)
        logprobs = torch.zeros(completion.shape, device=prompt_ids.device) if logprobs is not None else None
    lengths, clipped = completion_lengths(completion, eos_ids)
    mask = mask_from_lengths(lengths, completion.shape[1])
    completion = torch.where(mask.bool(), completion, torch.full_like(completion, pad_id))
    if logprobs is not None:  # 0 past the EOS, as the built-in sampler records (generate's pad may be -inf)
        logprobs = torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))
    return Rollout(completion, mask, lengths, clipped, logprobs if record_logprobs else None)


def _sample(
    model, prompt_ids, prompt_mask, cfg, eos_ids, pad_id, record_logprobs, greedy, num_samples, engine
):
    was_training = model.training
    model.eval()  # dropout off; KV cache on
    try:
        if engine == "sdft":
            from .sampling import merged_lora, sample_completions

            with merged_lora(model):
                completion, logprobs = sample_completions(
                    model,
                    prompt_ids,
                    prompt_mask,
                    max_new_tokens=cfg.max_new_tokens,
                    eos_ids=eos_ids,
                    pad_id=pad_id,
                    num_samples=num_samples,
                    temperature=cfg.temperature,
                    top_k=cfg.top_k,
                    top_p=cfg.top_p,
                    greedy=greedy,
                    logprobs=record_logprobs,
                )
        else:
            completion, logprobs = _hf_generate(
                model,
                prompt_ids.repeat_interleave(num_samples, 0),
                prompt_mask.repeat_interleave(num_samples, 0),
                cfg,
                eos_ids,
                pad_id,
                record_logprobs,
                greedy,
            )
    finally:
        model.train(was_training)
    return completion, logprobs


def _hf_generate(model, prompt_ids, prompt_mask, cfg, eos_ids, pad_id, record_logprobs, greedy):
    """transformers' `generate` (used by backends with their own fast generate, e.g. Unsloth).

    generate runs custom logits processors before its own warpers, so the recorder would see
    unwarped scores: the warpers run here, as ours, ahead of it, and generate's are off.
    """
    from transformers import LogitsProcessorList

    processors = [] if greedy else recipe_warpers(cfg)
    recorder = _SampledLogprobs() if record_logprobs else None
    if recorder is not None:
        processors.append(recorder)
    with _recipe_only(model):
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            logits_processor=LogitsProcessorList(processors),
            **generate_kwargs(cfg, greedy, eos_ids, pad_id),
        )
    completion = out[:, prompt_ids.shape[1] :]
    logprobs = (
        recorder.finish(completion[:, -1])[:, : completion.shape[1]]
        if recorder and completion.shape[1]
        else None
    )
    return completion, logprobs


def concat_prompt_completion(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[left-padded prompt | right-padded completion]; returns ids, mask, prompt width P."""
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return ids, mask, prompt_ids.shape[1]


def completion_hidden(hidden: torch.Tensor, prompt_width: int, num_completion_tokens: int) -> torch.Tensor:
    """Hidden states that predict completion tokens 0..T-1: columns P-1 .. P+T-2."""
    return hidden[:, prompt_width - 1 : prompt_width - 1 + num_completion_tokens]


def loss_mask(completion_mask: torch.Tensor, skip_first_tokens: int) -> torch.Tensor:
    """Completion positions that enter the loss: valid tokens from index `skip_first_tokens` on."""
    keep = completion_mask.bool().clone()
    keep[:, :skip_first_tokens] = False
    return keep

"""Student rollouts and the sequence layout both sides are scored on.

Layout of every scored sequence: [left-padded prompt | completion, right-padded]. The prompt
differs between student and teacher (and so does its width), the completion ids are the same
tensor for both, so completion token t sits at column P + t on each side and is predicted by the
hidden state at column P + t - 1. Masks come from lengths, never from `ids != pad` (pad may
equal eos).
"""

from __future__ import annotations

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
    """transformers' `generate` (used by backends with their own fast generate, e.g. Unsloth)."""
    from transformers import LogitsProcessorList

    recorder = _SampledLogprobs() if record_logprobs else None
    sampling = {} if greedy else dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or None)
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=not greedy,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
        logits_processor=LogitsProcessorList([recorder]) if recorder else None,
        **sampling,
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

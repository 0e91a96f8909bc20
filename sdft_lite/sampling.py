"""A lean sampling loop for rollouts: KV cache, logits of the last position only, exact
inverse-CDF sampling instead of `torch.multinomial`, one prefill shared by a prompt's samples.

Why not `model.generate`: on CPU, `torch.multinomial` over a 150k vocabulary costs several
times the output-head matmul of a small model (it was a fifth of TRL's whole step in our
profile). Inverse-CDF sampling (softmax, cumulative sum, binary search of one uniform number
per row) draws from the same distribution: the only difference is fp32 rounding of the partial
sums, far below anything a sampler test can see (tests/test_sampling.py checks frequencies).
"""

from __future__ import annotations

import torch

from .models import position_ids_from_mask


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), as `generate` applies them. fp32 in, fp32 out."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p (keeps at least one).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row by inverse CDF. Returns (token ids [B], log-probs of those tokens [B]).

    One exp pass and one cumulative sum over the vocabulary; the log-prob is taken only for the
    sampled token (no full log_softmax).
    """
    logits = logits.float()
    shifted = logits - logits.max(-1, keepdim=True).values
    cdf = shifted.exp().cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * total
    tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
    picked = shifted.gather(-1, tokens)
    # searchsorted(right=True) never lands on a zero-probability token unless rounding put u at
    # the very end of the CDF; then take the last token that has probability.
    bad = picked == float("-inf")
    if bad.any():
        last = (shifted > float("-inf")).long().cumsum(-1).argmax(-1, keepdim=True)
        tokens = torch.where(bad, last, tokens)
        picked = shifted.gather(-1, tokens)
    return tokens.squeeze(-1), (picked - total.log()).squeeze(-1)


@torch.no_grad()
def sample_completions(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `num_samples` completions per left-padded prompt row.

    Returns (completion ids [B * num_samples, T], log-probs of each sampled token under the
    warped distribution [B * num_samples, T]); rows are grouped per prompt (repeat_interleave
    order). Tokens after a row's first EOS are `pad_id` (log-prob 0); T stops early when all
    rows have finished.
    """
    from transformers import DynamicCache

    device = prompt_ids.device
    cache = DynamicCache()
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float()
    cache = out.past_key_values
    mask = prompt_mask
    if num_samples > 1:  # one prefill per prompt, its KV cache copied for each sample
        cache.batch_repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, 0)
        mask = mask.repeat_interleave(num_samples, 0)
    rows = logits.shape[0]
    next_pos = mask.sum(-1, keepdim=True)  # positions count real tokens only (left padding)
    eos = torch.tensor(eos_ids, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens, logps = [], []
    for step in range(max_new_tokens):
        warped = warp_logits(logits, temperature, top_k, top_p) if not greedy else logits
        if greedy:
            tok = warped.argmax(-1)
            lp = torch.log_softmax(warped, -1).gather(-1, tok[:, None]).squeeze(-1)
        else:
            tok, lp = sample_from_logits(warped)
        tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        logps.append(torch.where(finished, torch.zeros_like(lp), lp))
        finished |= torch.isin(tok, eos)
        if finished.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos + step,
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()
        cache = out.past_key_values
    return torch.stack(tokens, 1), torch.stack(logps, 1)

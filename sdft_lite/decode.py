"""A lean decode step for Llama-family decoders (Llama, Qwen2, Qwen3, Mistral): one token per
row, a preallocated KV cache, rotary tables computed once per rollout.

A decode step of a small model is mostly per-step framework work rather than arithmetic: the
generic forward rebuilds the attention mask and the rotary tables, grows the KV cache by
concatenation and copies keys and values for grouped-query attention, every step. Here the
cache is written in place, the padding mask is built once, and attention reads the grouped
keys directly (`enable_gqa`). The layers' own modules (projections, norms, MLP) do the math,
so LoRA, merged LoRA and quantized linears behave as in the generic forward; results differ
from it by fp32 rounding only (tests/test_decode.py compares hidden states and sampled tokens).

Anything else (other architectures, sliding windows that the rollout can reach, attention
implementations other than sdpa/eager, an external cache format) keeps the generic forward:
`LeanDecoder.supports` says which.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # the same in all four

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")


def _preallocated(t: torch.Tensor, total: int) -> torch.Tensor:
    """[B, kv heads, P, head dim] prefill keys or values -> a [B, kv heads, total, head dim] buffer
    holding them in its first P columns."""
    out = t.new_empty(t.shape[0], t.shape[1], total, t.shape[3])
    out[:, :, : t.shape[2]] = t
    return out


class LeanDecoder:
    """Decode steps after an ordinary prefill. `step(tokens)` -> last hidden state [B, H] (after
    the final norm), as `decoder(input_ids=tokens[:, None], ...)` would return it."""

    @staticmethod
    def supports(decoder, total_length: int) -> bool:
        config = decoder.config
        if getattr(config, "model_type", None) not in SUPPORTED:
            return False
        if getattr(config, "_attn_implementation", "eager") not in ("sdpa", "eager"):
            return False
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)  # per layer; without it every layer slides
        sliding = window is not None and (any(t != "full_attention" for t in types) if types else True)
        if sliding and total_length > window:  # a window the rollout can reach: generic mask
            return False
        layers = getattr(decoder, "layers", None)
        needed = ("embed_tokens", "norm", "rotary_emb")
        return layers is not None and all(hasattr(decoder, n) for n in needed)

    def __init__(self, decoder, cache, mask: torch.Tensor, next_pos: torch.Tensor, max_new_tokens: int):
        """`cache`: the prefill's DynamicCache (rows already repeated per sample); `mask`: its
        [B, P] attention mask; `next_pos`: [B, 1] position of the first new token."""
        self.decoder = decoder
        self.layers = list(decoder.layers)
        rows, width = mask.shape
        total = width + max_new_tokens
        self.keys = [_preallocated(layer.keys, total) for layer in cache.layers]
        self.values = [_preallocated(layer.values, total) for layer in cache.layers]
        self.attend = torch.ones(rows, 1, 1, total, dtype=torch.bool, device=mask.device)
        self.attend[:, 0, 0, :width] = mask.bool()
        positions = next_pos + torch.arange(max_new_tokens, device=mask.device)[None, :]
        probe = self.keys[0].new_empty(1)
        self.cos, self.sin = decoder.rotary_emb(probe, positions)  # [B, T, head dim]
        self.width, self.steps = width, 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        s = self.steps
        at = self.width + s  # the cache column of this token
        cos, sin = self.cos[:, s : s + 1], self.sin[:, s : s + 1]  # [B, 1, head dim]
        x = self.decoder.embed_tokens(tokens[:, None])  # [B, 1, H]
        rows = x.shape[0]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            d = attn.head_dim
            q = attn.q_proj(h).view(rows, 1, -1, d)
            k = attn.k_proj(h).view(rows, 1, -1, d)
            v = attn.v_proj(h).view(rows, 1, -1, d)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # [B, 1, heads, d]
            self.keys[i][:, :, at] = k[:, 0]
            self.values[i][:, :, at] = v[:, 0]
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                self.keys[i][:, :, : at + 1],
                self.values[i][:, :, : at + 1],
                attn_mask=self.attend[..., : at + 1],
                scale=attn.scaling,
                enable_gqa=True,
            )
            x = x + attn.o_proj(out.transpose(1, 2).reshape(rows, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.steps += 1
        return self.decoder.norm(x)[:, -1]

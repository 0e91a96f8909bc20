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

Fused step (`FusedLayer`): where every linear layer of a small decoder is a plain fp32 weight (an
`nn.Linear`, or a LoRA layer merged for the rollout by `sampling.merged_lora`) and its norms are
the family's RMSNorm, a step runs on the raw weights with a third of the ops: one product for
q, k, v and the rotated-half q, k (the rotation `rotate_half` is a signed permutation of each
head's outputs, so it is folded into copies of the q and k rows: rotary is then two elementwise
ops), one for gate and up, `F.rms_norm`, and the residual adds inside `addmm`. A decode step of
such a model is per-op framework work, so the op count is its cost.

C step (`CStep`): the fused step's model (SiLU MLPs, no q/k norms), where the C kernels build
(`kernels.library`), runs as one call of `sdft_decode_step` (sdft_lite/csrc/cpu_kernels.c): the
whole step, every layer, on transposed copies of the fused weights and a per-head transposed key
cache, with no framework work between its ops.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # the same in all four

from . import kernels

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
# The fused step's weight copies (q, k, v and the rotated q, k rows; gate and up) at most this many
# bytes for the whole decoder: it is for small decoders, whose steps are per-op overhead.
FUSED_MAX_BYTES = 64 * 2**20
# The fused step through the C kernel `sdft_decode_step` where it applies (`CStep`).
C_STEP = True


def _preallocated(t: torch.Tensor, total: int) -> torch.Tensor:
    """[B, kv heads, P, head dim] prefill keys or values -> a [B, kv heads, total, head dim] buffer
    holding them in its first P columns."""
    out = t.new_empty(t.shape[0], t.shape[1], total, t.shape[3])
    out[:, :, : t.shape[2]] = t
    return out


def _hooked(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def plain_linear(module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(fp32 weight, bias) that `module(x)` computes `F.linear(x, weight, bias)` with, or None: an
    `nn.Linear` without hooks, or a LoRA layer while `sampling.merged_lora` has merged it."""
    if _hooked(module):
        return None
    merged = getattr(module, "sdft_merged", None)
    if merged is not None:
        weight, bias = merged
    elif type(module) is torch.nn.Linear:
        weight, bias = module.weight, module.bias
    else:
        return None
    return (weight, bias) if weight.dtype == torch.float32 else None


def plain_embedding(module) -> torch.Tensor | None:
    """The fp32 weight of a plain `nn.Embedding` (no hooks, no max_norm), or None."""
    if type(module) is not torch.nn.Embedding or module.max_norm is not None:
        return None
    if _hooked(module) or module.weight.dtype != torch.float32:
        return None
    return module.weight


def _rms_norm_of(module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of the family's RMSNorm (weight * x / sqrt(mean x^2 + eps), in fp32), or None."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not type(module).__name__.endswith("RMSNorm") or weight is None or eps is None:
        return None
    if _hooked(module) or weight.dtype != torch.float32:
        return None
    return weight, float(eps)


def _rotated_rows(weight: torch.Tensor, head_dim: int, negate: bool = True) -> torch.Tensor:
    """The rows that give rotate_half of each head's outputs: rotate_half(x W^T) = x R(W)^T, with
    R(W) each head's second half of rows negated, then its first half (exact in fp32); with
    `negate=False`, the same permutation alone (for per-head weights that follow the rows)."""
    w = weight.view(-1, 2, head_dim // 2, *weight.shape[1:])
    second = -w[:, 1:] if negate else w[:, 1:]
    return torch.cat([second, w[:, :1]], dim=1).reshape(weight.shape)


def _bias(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return weight.new_zeros(weight.shape[0]) if bias is None else bias


def _residual(x: torch.Tensor, inputs: torch.Tensor, weight_t: torch.Tensor, bias) -> torch.Tensor:
    """x + F.linear(inputs, weight, bias): one `addmm` without a bias."""
    if bias is None:
        return torch.addmm(x, inputs, weight_t)
    return x + F.linear(inputs, weight_t.t(), bias)


class FusedLayer:
    """One decoder layer's weights for the fused step (module docstring), or `build` gives None."""

    @classmethod
    def build(cls, layer, room: int) -> FusedLayer | None:
        """The layer's fused weights, or None: a layer that is not all plain, or whose copies
        would take more than `room` bytes (checked before any copy is made)."""
        parts = cls.parts(layer)
        if parts is None or cls.copy_bytes(*parts[2]) > room:
            return None
        return cls(*parts[:2], *parts[3:])

    @staticmethod
    def parts(layer) -> tuple | None:
        """(attn, mlp, the q, k, v, gate, up weights, plain linears, norms, q/k norms) of a layer
        whose modules are all plain, else None; nothing is copied."""
        attn, mlp = layer.self_attn, layer.mlp
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(m is None for m in linears) or not callable(getattr(mlp, "act_fn", None)):
            return None
        plain = [plain_linear(m) for m in linears]
        norms = [_rms_norm_of(layer.input_layernorm), _rms_norm_of(layer.post_attention_layernorm)]
        qk_norms = [_rms_norm_of(getattr(attn, n)) for n in ("q_norm", "k_norm") if hasattr(attn, n)]
        if any(p is None for p in plain + norms + qk_norms):
            return None
        (wq, _), (wk, _), (wv, _), _, (wg, _), (wu, _), _ = plain
        return attn, mlp, (wq, wk, wv, wg, wu), plain, norms, qk_norms

    @staticmethod
    def copy_bytes(wq, wk, wv, wg, wu) -> int:
        """Bytes of the fused copies: q and k rows twice (plain and rotated), v, gate and up."""
        rows = 2 * (wq.shape[0] + wk.shape[0]) + wv.shape[0] + wg.shape[0] + wu.shape[0]
        return rows * wq.shape[1] * wq.element_size()

    def __init__(self, attn, mlp, plain, norms, qk_norms):
        (wq, bq), (wk, bk), (wv, bv), (wo, bo), (wg, bg), (wu, bu), (wd, bd) = plain
        d = attn.head_dim
        self.head_dim, self.scaling, self.act = d, attn.scaling, mlp.act_fn
        self.q_heads, self.kv_heads = wq.shape[0] // d, wk.shape[0] // d
        wqk = torch.cat([wq, wk])
        self.w_qkv = torch.cat([wqk, _rotated_rows(wqk, d), wv])
        self.b_qkv = None
        if bq is not None or bk is not None or bv is not None:
            bqk = torch.cat([_bias(wq, bq), _bias(wk, bk)])
            self.b_qkv = torch.cat([bqk, _rotated_rows(bqk, d), _bias(wv, bv)])
        self.wo_t, self.bo, self.wd_t, self.bd = wo.t(), bo, wd.t(), bd
        self.w_gate_up = torch.cat([wg, wu])
        self.b_gate_up = None if bg is None and bu is None else torch.cat([_bias(wg, bg), _bias(wu, bu)])
        self.intermediate = wg.shape[0]
        (self.w_in, self.eps_in), (self.w_post, self.eps_post) = norms
        self.qk_norm = None
        if qk_norms:  # per head, before rotary: the rotated rows take the weight permuted alike
            (wqn, eps), (wkn, _) = qk_norms
            heads = torch.cat([wqn.expand(self.q_heads, d), wkn.expand(self.kv_heads, d)])
            rotated = _rotated_rows(heads.reshape(-1), d, negate=False).view(heads.shape)
            self.qk_norm = (torch.cat([heads, rotated]), float(eps))

    def nbytes(self) -> int:
        return (self.w_qkv.numel() + self.w_gate_up.numel()) * self.w_qkv.element_size()


def _is_silu(act) -> bool:
    """torch's SiLU, or transformers' `SiLUActivation` (F.silu), with no hooks."""
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return silu and not _hooked(act)


class CStep:
    """The fused step as one C call (module docstring): the arguments of `sdft_decode_step`, kept
    for one rollout. `build` gives None where it does not apply: no C kernels, an MLP activation
    other than SiLU, q/k norms, or copies over `FUSED_MAX_BYTES`."""

    @classmethod
    def build(cls, lean: LeanDecoder) -> CStep | None:
        lib = kernels.library() if C_STEP else None
        fused = lean.fused
        if lib is None or any(f.qk_norm is not None or not _is_silu(f.act) for f in fused):
            return None
        f0 = fused[0]
        if any(
            (f.head_dim, f.q_heads, f.kv_heads, f.intermediate)
            != (f0.head_dim, f0.q_heads, f0.kv_heads, f0.intermediate)
            for f in fused
        ):
            return None
        copies = sum(f.w_qkv.numel() + f.w_gate_up.numel() + f.wo_t.numel() + f.wd_t.numel() for f in fused)
        if copies * 4 > FUSED_MAX_BYTES:
            return None
        return cls(lib, lean)

    def __init__(self, lib, lean: LeanDecoder):
        self.lib, f0 = lib, lean.fused[0]
        self.shape = (f0.q_heads, f0.kv_heads, f0.head_dim, f0.intermediate)
        self.scaling = float(f0.scaling)
        self.keep = []  # every tensor whose memory the C structs point at

        def ptr(t: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> int | None:
            if t is None:
                return None
            t = t.detach().to(dtype).contiguous()
            self.keep.append(t)
            return t.data_ptr()

        layers = (kernels.DecodeLayer * len(lean.fused))()
        for i, f in enumerate(lean.fused):
            layers[i] = kernels.DecodeLayer(
                ptr(f.w_in), ptr(f.w_qkv.t()), ptr(f.b_qkv), ptr(f.wo_t), ptr(f.bo), ptr(f.w_post),
                ptr(f.w_gate_up.t()), ptr(f.b_gate_up), ptr(f.wd_t), ptr(f.bd),
                ptr(lean.keys[i].transpose(2, 3)), ptr(lean.values[i]), f.eps_in, f.eps_post,
            )  # fmt: skip
        self.layers = layers
        lean.keys = None  # the C step's own transposed copies replace them (values are shared)
        self.embed, self.final = ptr(lean.embed), ptr(lean.final_norm[0])
        self.eps_final = float(lean.final_norm[1])
        self.cos = ptr(lean.cos.transpose(0, 1))  # [T, B, d]
        self.sin = ptr(lean.sin.transpose(0, 1))
        self.attend = ptr(lean.attend.view(lean.attend.shape[0], -1), torch.uint8)
        rows, self.total = lean.attend.shape[0], lean.attend.shape[-1]
        self.rows, self.hidden, self.vocab = rows, lean.embed.shape[1], lean.embed.shape[0]
        self.step_bytes = rows * f0.head_dim * 4
        n = lib.sdft_decode_scratch(rows, self.hidden, *self.shape, self.total)
        self.scratch = torch.empty(n)

    def __call__(self, tokens: torch.Tensor, step: int, at: int) -> torch.Tensor:
        tokens = tokens.to(torch.int64).contiguous()
        if tokens.shape != (self.rows,):
            raise ValueError(f"CStep: {tuple(tokens.shape)} token ids for {self.rows} rows")
        out = torch.empty(self.rows, self.hidden)
        code = self.lib.sdft_decode_step(
            ctypes.addressof(self.layers), len(self.layers), self.embed, self.vocab, tokens.data_ptr(),
            self.rows, self.hidden, *self.shape, self.scaling, self.cos + step * self.step_bytes,
            self.sin + step * self.step_bytes, self.attend, self.total, at, self.final, self.eps_final,
            self.scratch.data_ptr(), self.scratch.numel(), out.data_ptr(),
        )  # fmt: skip
        if code != 0:
            raise ValueError(
                f"sdft_decode_step kernel: bad arguments (token ids {tokens.tolist()}, column {at})"
            )
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

    @classmethod
    def path(cls, decoder, total_length: int, device: torch.device) -> str:
        """Which step a rollout of `total_length` columns would run, without copying anything:
        "c_step" (`CStep`), "fused" (`FusedLayer`), "modules" (this class's step through the
        layers' modules) or "generic" (the decoder's own forward: `supports` says no). It
        mirrors `_fused_layers` and `CStep.build` (tests/test_decode.py checks that it agrees)."""
        if not cls.supports(decoder, total_length):
            return "generic"
        if plain_embedding(decoder.embed_tokens) is None or _rms_norm_of(decoder.norm) is None:
            return "modules"
        parts = [FusedLayer.parts(layer) for layer in decoder.layers]
        if any(p is None for p in parts):
            return "modules"
        room, shapes, c_bytes, c_step = FUSED_MAX_BYTES, set(), 0, True
        for attn, mlp, weights, plain, _, qk_norms in parts:
            room -= FusedLayer.copy_bytes(*weights)
            if room < 0:
                return "modules"
            wq, wk, _, wg, _ = weights
            d = attn.head_dim
            shapes.add((d, wq.shape[0] // d, wk.shape[0] // d, wg.shape[0]))
            c_bytes += FusedLayer.copy_bytes(*weights) + 4 * (plain[3][0].numel() + plain[6][0].numel())
            c_step = c_step and not qk_norms and _is_silu(mlp.act_fn)
        lib = kernels.library() if C_STEP and device.type == "cpu" else None
        c_step = c_step and lib is not None and len(shapes) == 1 and c_bytes <= FUSED_MAX_BYTES
        return "c_step" if c_step else "fused"

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
        self.fused = self._fused_layers(decoder)
        self.c_step = None
        if self.fused is not None:  # [T, B, 1, head dim]: step s's tables are [B, 1, d] views
            self.cos_steps, self.sin_steps = (t.transpose(0, 1)[:, :, None] for t in (self.cos, self.sin))
            if mask.device.type == "cpu":
                self.c_step = CStep.build(self)

    def _fused_layers(self, decoder) -> list[FusedLayer] | None:
        embed, norm = plain_embedding(decoder.embed_tokens), _rms_norm_of(decoder.norm)
        if embed is None or norm is None:
            return None
        layers, total = [], 0
        for layer in self.layers:
            fused = FusedLayer.build(layer, FUSED_MAX_BYTES - total)
            if fused is None:
                return None
            total += fused.nbytes()
            layers.append(fused)
        self.embed, self.final_norm = embed, norm
        return layers

    def _fused_step(self, tokens: torch.Tensor) -> torch.Tensor:
        s = self.steps
        at = self.width + s
        cos, sin = self.cos_steps[s], self.sin_steps[s]  # [B, 1, d]
        x = F.embedding(tokens, self.embed)  # [B, H]
        rows, hidden = x.shape
        for i, f in enumerate(self.fused):
            d, heads = f.head_dim, f.q_heads + f.kv_heads
            h = F.rms_norm(x, (hidden,), f.w_in, f.eps_in)
            qkv = F.linear(h, f.w_qkv, f.b_qkv)
            both = qkv[:, : 2 * heads * d].view(rows, 2 * heads, d)  # q, k, then their rotated halves
            if f.qk_norm is not None:
                both = F.rms_norm(both, (d,), None, f.qk_norm[1]).mul_(f.qk_norm[0])
            rotated = torch.addcmul(both[:, :heads] * cos, both[:, heads:], sin)  # [B, heads, d]
            self.keys[i][:, :, at] = rotated[:, f.q_heads :]
            self.values[i][:, :, at] = qkv[:, 2 * heads * d :].view(rows, f.kv_heads, d)
            out = F.scaled_dot_product_attention(
                rotated[:, : f.q_heads, None],
                self.keys[i][:, :, : at + 1],
                self.values[i][:, :, : at + 1],
                attn_mask=self.attend[..., : at + 1],
                scale=f.scaling,
                enable_gqa=True,
            )
            x = _residual(x, out.view(rows, -1), f.wo_t, f.bo)
            h = F.rms_norm(x, (hidden,), f.w_post, f.eps_post)
            gate_up = F.linear(h, f.w_gate_up, f.b_gate_up)
            act = f.act(gate_up[:, : f.intermediate]).mul_(gate_up[:, f.intermediate :])
            x = _residual(x, act, f.wd_t, f.bd)
        self.steps += 1
        return F.rms_norm(x, (hidden,), *self.final_norm)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.c_step is not None:
            out = self.c_step(tokens, self.steps, self.width + self.steps)
            self.steps += 1
            return out
        if self.fused is not None:
            return self._fused_step(tokens)
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

"""A lean sampling loop for rollouts: KV cache, logits of the last position only, exact
inverse-CDF sampling instead of `torch.multinomial`, one prefill shared by a prompt's samples.

Why not `model.generate`: on CPU, `torch.multinomial` over a 150k vocabulary costs several
times the output-head matmul of a small model (it was a fifth of TRL's whole step in our
profile). Inverse-CDF sampling (softmax, cumulative sums, binary search of one uniform number
per row) draws from the same distribution: the only difference is fp32 rounding of the partial
sums, far below anything a sampler test can see (tests/test_sampling.py checks frequencies).

Per token the loop runs the decoder (on CPU, `decode.LeanDecoder`'s step for Llama-family
models) and then the output head itself (`decode_head`: on CPU an fp32 head runs in the matmul
layout measured fastest for this CPU's vector path), or, for plain temperature sampling
without log-probs, an int8 copy of it as the proposal of an exact rejection sampler
(`Int8Proposal`: same distribution, about a quarter of the bytes read; its pass over the
vocabulary runs in a C kernel built on first use, `kernels.py`, or else through PyTorch's int8
product). The rollout caller runs
the loop inside `merged_lora` (plain LoRA layers as one matmul with merged weights). Both change
fp32 rounding only. Decode steps of a tiny decoder run on one intra-op thread
(`_tiny_decode_step`).

Every such choice is a fixed rule of the CPU's features (PyTorch's vector path, what the C
kernels built), the model and the tensors' sizes, never a timing taken during the run: the same
recipe and seed sample the same tokens on one machine whatever its load. `rollout_paths` says
which paths a model's rollouts take (for a run's log).
"""

from __future__ import annotations

import collections
import contextlib
import math
import weakref
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .decode import LeanDecoder
from .models import causal_lm, output_head, position_ids_from_mask


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


SAMPLE_BLOCK = 2048  # tokens per block of the two-level inverse CDF


def _last_positive(x: torch.Tensor) -> torch.Tensor:
    """Index of the last entry > 0 in each row, [B, 1] (rows are known to have one)."""
    return (x > 0).long().cumsum(-1).argmax(-1, keepdim=True)


# Below this a row's unshifted probabilities sum too close to fp32's underflow (see `_row_masses`).
MIN_ROW_MASS = 1e-9


def _block_masses(probs: torch.Tensor, block: int) -> torch.Tensor:
    """[B, V] -> [B, ceil(V / block)] sums of consecutive blocks of `block` tokens (the last may be partial)."""
    rows, vocab = probs.shape
    full = vocab // block
    mass = probs[:, : full * block].view(rows, full, block).sum(-1)
    if full * block < vocab:
        mass = torch.cat([mass, probs[:, full * block :].sum(-1, keepdim=True)], dim=1)
    return mass


def _row_masses(
    logits: torch.Tensor, block: int, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's probabilities up to a per-row factor, in the logits' own layout, and their block masses.

    exp(logits) without the max shift of a softmax: one pass over the vocabulary instead of three.
    In the decode loop the head's weight has just streamed through the cache, so each pass over
    the [B, V] logits comes from memory (profiled on the 2-core AMD EPYC at [4, 151936]: the
    shift's subtraction alone took 1.2 ms per token in the loop, 0.1 ms with a warm cache), and a
    vocabulary-major view (see `decode_head`) makes per-row maxima strided ones (2.2 ms).
    Without a shift, fp32 overflows for logits above ~88 and a row whose logits all lie far below
    zero loses precision, so rows are checked through their total: a non-finite total, or one
    under `MIN_ROW_MASS` (the row's maximum is then below about -33, and only tokens more than ~54
    nats under it, probability < 1e-23, could fall out of fp32's normal range), sends the batch
    to `torch.softmax`, which shifts every row by its own maximum. `out`, if given, receives the
    probabilities (same shape and layout as `logits`; not used by the softmax fallback).
    """
    probs = torch.exp(logits) if out is None else torch.exp(logits, out=out)
    mass = _block_masses(probs, block)
    total = mass.sum(-1)
    if not (torch.isfinite(total) & (total >= MIN_ROW_MASS)).all():
        probs = torch.softmax(logits, dim=-1)
        mass = _block_masses(probs, block)
    return probs, mass


def sample_from_logits(
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    block: int = SAMPLE_BLOCK,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row by a two-level inverse CDF. Returns (token ids [B], their log-probs [B]).

    `logits` [B, V] may be row-major or a vocabulary-major view ([V, B] storage): every pass over
    the vocabulary is elementwise or a block sum, which runs in storage order either way. One
    pass for the unnormalised probabilities, one block-sum reduction, a cumulative sum over the
    few block masses, then a cumulative sum inside the chosen block only: a sequential cumsum
    over the whole vocabulary was the sampler's slowest op (measured 1.1 -> 0.36 ms per
    [4, 151936] row batch). Exact up to fp32 rounding of the partial sums; a draw that rounding
    pushes past the last token with mass is moved back onto it, so a zero-probability token is
    never returned. `out`: an fp32 buffer shaped and laid out like `logits` for the unnormalised
    probabilities (the decode loop passes one, so nothing of size [B, V] is allocated per token).
    """
    probs, mass = _row_masses(logits.float(), block, out)
    return _draw(probs, mass, mass.cumsum(-1), block, generator)


def _draw(
    probs: torch.Tensor,
    mass: torch.Tensor,
    cdf: torch.Tensor,
    block: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One inverse-CDF draw per row from `_row_masses`' output and the block masses' cumulative
    sums: (token ids [B], log-probs [B]). Drawing again from the same tensors costs no pass over
    the vocabulary (the rejection sampler of `Int8Proposal` does)."""
    vocab = probs.shape[1]
    total = cdf[:, -1:]
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator) * total
    blk = torch.searchsorted(cdf, u, right=True).clamp_(max=mass.shape[1] - 1)
    empty = mass.gather(-1, blk) <= 0
    if empty.any():
        blk = torch.where(empty, _last_positive(mass), blk)
    before = cdf.gather(-1, blk) - mass.gather(-1, blk)
    ids = blk * block + torch.arange(block, device=probs.device)
    inside = ids < vocab
    ids = ids.clamp_(max=vocab - 1)
    inner = probs.gather(-1, ids) * inside
    j = torch.searchsorted(inner.cumsum(-1), (u - before).clamp_(min=0), right=True).clamp_(max=block - 1)
    p = inner.gather(-1, j)
    bad = p <= 0
    if bad.any():
        j = torch.where(bad, _last_positive(inner), j)
        p = inner.gather(-1, j)
    return ids.gather(-1, j).squeeze(-1), (p.log() - total.log()).squeeze(-1)


# A transposed head copy is never larger than this.
DECODE_HEAD_COPY_MAX_BYTES = 128 * 2**20
# Heads smaller than this stay in cache, where the layouts differ by microseconds and an int8
# copy saves little: one fixed layout (the transposed copy) and no int8 proposal.
LARGE_HEAD_MIN_BYTES = 8 * 2**20
# The layout of a large head per PyTorch vector path (`cpu_capability`), measured (`head_layout`);
# any other path: the transposed copy where it fits, else "linear".
HEAD_LAYOUT_BY_CPU = {"AVX2": "vocab_major"}


def cpu_capability() -> str:
    """PyTorch's vector path on this CPU ("AVX512", "AVX2", "DEFAULT", ...): the path its BLAS and
    int8 kernels take, fixed for the machine (`ATEN_CPU_CAPABILITY` lowers it)."""
    return torch.backends.cpu.get_cpu_capability()


def choose_head_layout(shape: tuple[int, int], capability: str, contiguous: bool = True) -> str:
    """`head_layout`'s rule for an fp32 head weight of `shape` [V, H] on a CPU whose PyTorch
    vector path is `capability`: a pure function of them, so the same model samples the same
    tokens on one machine whatever its load."""
    nbytes = shape[0] * shape[1] * 4
    can_copy = contiguous and nbytes <= DECODE_HEAD_COPY_MAX_BYTES
    if nbytes >= LARGE_HEAD_MIN_BYTES and capability in HEAD_LAYOUT_BY_CPU:
        return HEAD_LAYOUT_BY_CPU[capability]
    return "transposed" if can_copy else "linear"


def head_layout(weight: torch.Tensor) -> str:
    """How the rollout multiplies hidden states by a CPU head weight [V, H] (`choose_head_layout`):

    - "transposed": [B, H] x [H, V] with the weight copied into that layout for the rollout;
    - "vocab_major": [V, H] x [H, B], logits [V, B] used through a transposed view, no copy;
    - "linear": `F.linear`, i.e. [B, H] x [V, H]^T, no copy.

    The three are the same products, but BLAS libraries run them at very different speeds, and
    which one wins depends on the CPU's vector path. Measured at [4, 128] x [128, 151936], fp32,
    2 threads, in the decode loop with the sampler: on an Intel Xeon (AVX-512) 3.0 ms per token
    transposed vs 3.8 ms linear; alone, on an AMD EPYC (AVX2, MKL): 7-10 ms vocab-major vs 16-20
    ms transposed and 22-25 ms linear (and at 4 and 16 rows, [128, 20480] and [896, 151936], the
    same order). The layout was once timed on the first rollout, but a timing taken on a loaded
    machine picks another layout, and the layouts' logits differ in fp32 rounding, so the same
    seed gave other tokens: it is now a fixed rule. Logits differ by fp32 rounding only.
    """
    return choose_head_layout(tuple(weight.shape), cpu_capability(), weight.is_contiguous())


def decode_head(model, rows: int) -> DecodeHead:
    """Last hidden state [B, H] -> fp32 logits [B, V] for one decode step.

    The output head reads its whole [V, H] weight for every generated token. On CPU, with a plain
    fp32 linear head, the matmul runs in the layout `head_layout` picks for this CPU (the logits
    may then be a vocabulary-major view, which `sample_from_logits` takes as it is), and writes
    a batch of `rows` into one buffer allocated here: the logits it returns for such a batch are
    valid until its next call. A [rows, V] tensor allocated and freed per token is what
    fragments glibc's heap (the train path serves tensors that size from the heap, see
    `train.mmap_threshold_bytes`): measured at [4, 151936] on the 2-core AMD EPYC, the first
    rollout left the resident set 40-90 MiB larger, varying from run to run, and 23-25 MiB with
    the buffers (measured while a head-layout timing still ran).
    A transposed copy lives for the rollout only, is made at the head's first call (a rollout
    that samples every token through `Int8Proposal` never makes it), and is never made for heads
    larger than `DECODE_HEAD_COPY_MAX_BYTES`; where it is made it costs its size in memory during
    the rollout (74 MiB and ~45 ms at [151936, 128]). Other heads (quantized, scaled, softcapped,
    GPU) are used as they are.
    """
    head = output_head(model)
    weight = head.linear_weight
    if weight is None or weight.device.type != "cpu":
        return DecodeHead(head)
    return DecodeHead(weight.detach(), head_layout(weight.detach()), rows)


class DecodeHead:
    """`decode_head`'s callable: hidden [B, H] -> fp32 logits [B, V] (for a plain CPU head in the
    layout `head_layout` chose, possibly a vocabulary-major view of a buffer reused for batches of
    `rows`)."""

    def __init__(
        self, head: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor, layout: str = "", rows: int = 0
    ):
        self.head = head if callable(head) else None  # any other head, used as it is
        self.weight = None if callable(head) else head
        if self.weight is not None:
            self.layout, self.rows, self._copy = layout, rows, None
            vocab = self.weight.shape[0]
            self.buffer = self.weight.new_empty((vocab, rows) if layout == "vocab_major" else (rows, vocab))

    def _logits(self, hidden: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
        h = hidden.to(self.weight.dtype)
        out = self.buffer if h.shape[0] == self.rows else None
        if self.layout == "vocab_major":
            return torch.mm(self.weight, h.t(), out=out).t()
        return torch.mm(h, weight_t, out=out)  # transposed: the copy; linear: what F.linear runs

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return self.head(hidden).float()
        if self.layout == "transposed" and self._copy is None:
            self._copy = self.weight.t().contiguous()
        return self._logits(hidden, self._copy if self.layout == "transposed" else self.weight.t())


# Exact sampling from an int8 copy of the output head, by rejection (see `Int8Proposal`).
INT8_PROPOSAL = True
# Rows quantized at a time: the copy is built without an fp32 temporary of the head's size.
INT8_BUILD_ROWS = 8192
# Nats: a token whose error bound E / T is larger uses the fp32 head (acceptance >= e^-2).
INT8_MAX_BOUND = 1.0
# Proposals per row and token before the row falls back to the fp32 head.
INT8_ROUNDS = 8
# Hidden coordinates kept fp32: at most this many, whose largest |W_vi| exceeds this factor
# times the median column's.
INT8_MAX_EXACT_COLUMNS = 8
INT8_OUTLIER_FACTOR = 4.0
# Where the proposal runs (`int8_proposal_enabled`), from measurements at [4, 128] x [128, 151936],
# 2 threads, against the fp32 head in its layout (`head_layout`). The C kernel on every vector
# path: AVX2 on the 2-core AMD EPYC 1.1-1.6 ms per token vs 7-10 ms, AVX-512 VNNI / AMX on the
# Intel Xeon 0.55-1.2 / 0.66 ms vs 3.0 ms; not its scalar C build (72-106 ms vs 27-33 ms on the
# AMD EPYC). Without the kernel, PyTorch's int8 product on the PyTorch vector paths below, whose
# int8 kernels are vectorized (AVX2: 1.43-1.58 times faster than the fp32 head on the AMD EPYC),
# not on others (ATEN_CPU_CAPABILITY=default there: 243-293 ms vs 26-32 ms).
INT8_TORCH_CPUS = ("AVX2", "AVX512")
# The int8 copy (V x H bytes) is never larger than this.
INT8_COPY_MAX_BYTES = 256 * 2**20
# The proposal's pass through the C kernel (sdft_lite/csrc/cpu_kernels.c) where it builds.
# Measured on the 2-core AMD EPYC at [4, 128] x [128, 151936]: 1.1-1.6 ms per token against
# 2.8-3.5 ms for PyTorch's int8 product and the separate passes after it (copy, outlier
# columns, exp, block sums).
INT8_C_KERNEL = True
_U = 2.0**-24  # fp32 unit roundoff


def _gamma(n: int) -> float:
    """The relative error bound of an fp32 sum of n products, in any order: n u / (1 - n u)."""
    return n * _U / (1 - n * _U)


PROPOSAL_STATS: collections.Counter = collections.Counter()  # rows sampled, draws, fallback rows
_INT8_HEADS: list = []  # the last head quantized: (weakref to its weight, its version, the Int8Proposal)


def pack_int8_rows(q: torch.Tensor, per: int = 2) -> torch.Tensor:
    """int8 rows [16 n, width] -> the C kernel's layout [n, width / per, 16, per]: groups of 16
    ids, and within a group, for each run of `per` columns, each id's `per` weights side by side
    (`sdft_int8_layout`: 2 for the AVX paths' int16 pairs, 4 for AMX tiles; see
    `sdft_lite/csrc/cpu_kernels.c`)."""
    groups, width = q.shape[0] // 16, q.shape[1]
    return q.view(groups, 16, width // per, per).permute(0, 2, 1, 3)


class Int8Proposal:
    """Tokens drawn exactly from softmax(h W^T / T), with W the fp32 head, while reading an int8 copy.

    On CPU the rollout's output head reads its whole fp32 weight for every generated token, and
    that read, not arithmetic, is the cost (README, "Speed and memory"). Here the head is copied
    once, and each token's logits are first computed approximately from the copy, reading about a
    quarter of the bytes:

    - outlier columns K (at most `INT8_MAX_EXACT_COLUMNS`, those whose largest |W_vi| exceeds
      `INT8_OUTLIER_FACTOR` times the median column's) stay fp32, as a [|K|, V] copy added by a
      rank-|K| update; an embedding with a few large coordinates (the bench's model has one)
      would otherwise set every row's int8 scale;
    - the other columns R become int8 rows q_v with bf16 scales s_v (W_vR ~ q_v s_v; zero in the
      columns K and in padding to a multiple of 32 columns, which the kernel's vector loads
      need), multiplied by `torch.ops.aten._weight_int8pack_mm` (bf16 hidden state, fp32
      accumulation, bf16 result).

    The approximation's error has a bound E per row that costs O(H) to compute (`bound`). With
    hb the bf16 h_R, |.| Euclidean norms, maxima over the vocabulary taken when the copy is made,
    w the padded width and g_n = n u / (1 - n u) for fp32 sums of n terms (u = 2^-24):

        |h W_v - approx_v| <= |h_R - hb| max|W_vR| + |hb| max|W_vR - q_v s_v|
                              + |hb| max|q_v s_v| (g_w + 2^-8 (1 + g_w))    (bf16 result: u = 2^-8)
                              + g_(|K|+1) (|hb| max|q_v s_v| (1 + g_w)(1 + 2^-8) + |h_K| max|W_vK|),

    plus the acceptance test's own fp32 rounding ((g_H + 2u) |h| max|W_v|, and 1e-6 nats for the
    proposal's exp and any underflow).

    That is the PyTorch path. Where the C kernel builds (`kernels.library`), the
    same int8 rows are multiplied by int16 activations with exact integer sums, and the kernel
    also adds the exact columns, exponentiates and sums the blocks the sampler needs, in one pass
    (`kernel_inputs` has its bound, `_sample_kernel` the acceptance test on the kernel's own
    probabilities): 1.1-1.9 ms per token against 2.8-3.5 ms for the PyTorch path's passes, on the
    2-core AMD EPYC at [4, 128] x [128, 151936], and a tighter bound (97.8 % of draws accepted in
    the bench, 96.2 % before). The kernel reads the int8 rows packed in groups of 16 ids
    (`pack_int8_rows`), so each multiply-add yields 16 ids' partial sums with no reduction across
    lanes (AVX-512 VNNI where there is one: 0.55-1.2 ms against 1.0-1.65 ms for the row-major
    AVX2 kernel on the 2-core Intel Xeon); that copy replaces the row-major one. Where the CPU
    has AMX (`kernels.simd()`), the groups hold 4 columns per id instead of 2, one [16, 64]
    weight tile each 64 columns: 4 / 8 / 16 rows 0.66 / 0.81 / 1.14 ms per token against 0.70 /
    1.28 / 2.48 for VNNI on the Intel Xeon (at 4 rows the read of the int8 copy bounds both).

    So exp(logit_v) <= exp(approx_v + E) for every token, and rejection sampling is exact: a
    token v drawn from softmax(approx / T) is accepted with probability exp((h W_v - approx_v
    - E) / T), its exact logit computed from the one fp32 row W_v; a rejected row draws again
    from the same CDF (no pass over the vocabulary). The acceptance rate is at least
    exp(-2 E / T). A batch in which some row's E / T is above `INT8_MAX_BOUND`, or a row still
    rejected after `INT8_ROUNDS` draws, is sampled from the fp32 head instead; an accepted draw and such a
    fallback both follow the exact distribution, so their mixture does too (tests/test_sampling.py
    checks frequencies and the bound). Temperature only: top-k and top-p select tokens by their
    exact logits, and the draw's log-probability needs the exact normaliser, so callers that need
    either keep the fp32 head (`sample_completions`).
    """

    def __init__(self, weight: torch.Tensor):
        vocab, hidden = weight.shape
        self.weight = weight
        column_max = torch.zeros(hidden)
        for start in range(0, vocab, INT8_BUILD_ROWS):
            column_max = torch.maximum(column_max, weight[start : start + INT8_BUILD_ROWS].abs().amax(0))
        top = column_max.topk(min(INT8_MAX_EXACT_COLUMNS, hidden)).indices
        is_exact = torch.zeros(hidden, dtype=torch.bool)
        is_exact[top[column_max[top] > INT8_OUTLIER_FACTOR * column_max.median()]] = True
        self.exact_columns = is_exact.nonzero().squeeze(1)
        # The C kernel (`kernels.library`), where it builds, reads the int8 rows packed
        # (`pack_int8_rows`) and the vocabulary padded to a multiple of 32; PyTorch's int8
        # product reads them as rows. One of the two copies is kept.
        self.kernel = kernels.library() if INT8_C_KERNEL else None
        self.stride = -(-vocab // 32) * 32 if self.kernel is not None else vocab
        exact_t = weight.new_zeros(len(self.exact_columns), self.stride)
        exact_t[:, :vocab] = weight[:, self.exact_columns].t()
        self.exact_padded, self.exact_t = exact_t, exact_t[:, :vocab]  # [|K|, stride], [|K|, V]
        # The int8 rows span every column, zero in the exact ones, padded with zero columns to a
        # multiple of 32 (the kernel's vector loads need it; 64 for its AMX tiles): the bf16
        # input is then h itself.
        self.layout = self.kernel.sdft_int8_layout() if self.kernel is not None else 2
        self.width = width = -(-hidden // (16 * self.layout)) * 16 * self.layout
        if self.kernel is None:
            self.q = torch.zeros(vocab, width, dtype=torch.int8)
        else:
            self.q_packed = torch.zeros(
                self.stride // 16, width // self.layout, 16, self.layout, dtype=torch.int8
            )
        self.scales = torch.empty(vocab, dtype=torch.bfloat16)
        keep = (~is_exact).float()
        rest_max = error_max = copy_max = exact_max = row_max = 0.0
        finite = True
        for start in range(0, vocab, INT8_BUILD_ROWS):
            block = weight[start : start + INT8_BUILD_ROWS]
            finite = finite and bool(torch.isfinite(block).all())  # max() would drop a NaN
            w = block * keep
            scale = (w.abs().amax(1) / 127).to(torch.bfloat16)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero row: q = 0
            q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127)
            copy = q * scale.float()[:, None]  # what the kernel multiplies by: int8 * scale in fp32
            if self.kernel is None:
                self.q[start : start + len(w), :hidden] = q.to(torch.int8)
            else:  # INT8_BUILD_ROWS is a multiple of 16: whole groups
                rows_q = torch.zeros(-(-len(w) // 16) * 16, width, dtype=torch.int8)
                rows_q[: len(w), :hidden] = q.to(torch.int8)
                self.q_packed[start // 16 : start // 16 + len(rows_q) // 16] = pack_int8_rows(
                    rows_q, self.layout
                )
            self.scales[start : start + len(w)] = scale
            rest_max = max(rest_max, w.norm(dim=1).max().item())
            error_max = max(error_max, (w - copy).norm(dim=1).max().item())
            copy_max = max(copy_max, copy.norm(dim=1).max().item())
            exact_max = max(exact_max, (block - w).norm(dim=1).max().item())
            row_max = max(row_max, block.norm(dim=1).max().item())
        g_rest, g_exact = _gamma(width), _gamma(len(self.exact_columns) + 1)
        self.rest_max, self.exact_max = rest_max, exact_max
        self.error_max, self.copy_max = error_max, copy_max
        # Per unit of |hb|: the int8 part's error, and (for the fp32 sum with the exact columns) its size.
        self.per_hb = error_max + copy_max * (g_rest + 2.0**-8 * (1 + g_rest))
        self.size_per_hb = copy_max * (1 + g_rest) * (1 + 2.0**-8)
        self.g_exact = g_exact if len(self.exact_columns) else 0.0
        # The acceptance test's own fp32 arithmetic: the exact logit's dot product (any order of
        # H terms), and both logits' division by the temperature.
        self.dot_rounding = (_gamma(hidden) + 2 * _U) * row_max
        self.usable = finite and all(map(math.isfinite, (rest_max, error_max, copy_max, exact_max, row_max)))
        # Sums of squares over R and over K in one product: [.., H] @ [H, 2].
        self._columns = np.stack([(~is_exact).numpy(), is_exact.numpy()], axis=1).astype(np.float64)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rows = self.fallbacks = 0  # tokens sampled, and of them drawn from the fp32 head
        # The C kernel: int16 activations, the same int8 rows, fp32 scales (bf16 values), the
        # exact columns, exp and block masses in one pass. Its integer sums are exact while
        # |activation| <= act_max.
        if self.kernel is not None:
            self.scales32 = torch.zeros(self.stride)
            self.scales32[:vocab] = self.scales.float()
            # (columns past the first multiple of 32 are zero: the AMX padding leaves it alone)
            self.act_max = min(32767, (2**31 - 1) // (127 * -(-hidden // 32) * 32))
            self._keep = (~is_exact).numpy()
            self._keep_u8 = self._keep.astype(np.uint8)
            self._exact_np = np.ascontiguousarray(self.exact_columns.numpy(), dtype=np.int64)
            self.row_max = row_max
            # `sdft_int8_inputs`' constants, in the order it reads them
            self._bound_constants = np.array(
                [rest_max, error_max, copy_max, _gamma(3), self.g_exact, exact_max, row_max, _U]
            )

    def bound(self, hidden: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """(the int8 product's input: h in bf16, zero-padded [B, width]; the bound E [B]).

        The arithmetic on these [B, H] vectors runs in NumPy (float64): a few microseconds where
        a dozen small torch ops cost ~0.5 ms per token on the 2-core CPU."""
        rows, hidden_size = hidden.shape
        if self.width == hidden_size:
            hb = hidden.to(torch.bfloat16)
        else:
            hb = torch.zeros(rows, self.width, dtype=torch.bfloat16)
            hb[:, :hidden_size] = hidden
        h = hidden.numpy().astype(np.float64)
        hf = hb[:, :hidden_size].float().numpy().astype(np.float64)
        (d_rest, d_exact), (f_rest, f_exact) = np.sqrt(np.square([h - hf, hf]) @ self._columns).transpose(
            0, 2, 1
        )
        e = d_rest * self.rest_max + f_rest * self.per_hb + np.sqrt(np.square(h).sum(1)) * self.dot_rounding
        if self.g_exact:  # |h_K| <= |hb_K| + |h_K - hb_K|
            e = e + self.g_exact * (f_rest * self.size_per_hb + (f_exact + d_exact) * self.exact_max)
        return hb, e * (1 + 1e-3)  # a margin for the rounding of the norms themselves

    def kernel_inputs(self, hidden: torch.Tensor, temperature: float) -> tuple[np.ndarray, ...]:
        """`kernel_inputs_reference`'s (act, scale, hk, E / T), computed by the C kernel's
        `sdft_int8_inputs` in the same double arithmetic (up to the order of its sums; a dozen
        NumPy calls cost ~0.1 ms per token inside the rollout). A row with a value that is not
        finite gets E = NaN (it is then sampled from the fp32 head)."""
        rows, hidden_size = hidden.shape
        padded = -(-rows // 4) * 4
        h = hidden.detach().float().contiguous()
        act = np.empty((padded, self.width), dtype=np.int16)
        scale = np.empty(padded, dtype=np.float32)
        hk = np.empty((padded, len(self._exact_np)), dtype=np.float32)
        e = np.empty(rows)
        code = self.kernel.sdft_int8_inputs(
            h.data_ptr(), self._keep_u8.ctypes.data, self._exact_np.ctypes.data, self._bound_constants.ctypes.data,
            rows, hidden_size, len(self._exact_np), self.width, self.act_max, float(temperature),
            act.ctypes.data, scale.ctypes.data, hk.ctypes.data, e.ctypes.data,
        )  # fmt: skip
        if code != 0:
            raise ValueError(
                f"sdft_int8_inputs kernel: bad arguments ({rows} rows, temperature {temperature})"
            )
        return act, scale, hk, e

    def kernel_inputs_reference(self, hidden: torch.Tensor, temperature: float) -> tuple[np.ndarray, ...]:
        """The C kernel's inputs for `hidden` [B, H] and the bound E / T [B] of its approximation
        of every logit / T, rows padded with zeros to a multiple of 4: (int16 activations
        [B4, width], their fp32 scales r [B4], the fp32 exact columns of h [B4, |K|], E / T).

        h_R ~ x = r a, a = round(h_R / r) integers with |a| <= act_max, r = max |h_R| / act_max
        in fp32. The kernel's integer dot products a . q_v are exact, then L_v = fl(fl(D) fl(s_v r))
        plus the exact columns' fp32 fused multiply-adds, then exp(fl(L_v fl(1 / T))). With
        |.| Euclidean norms and the maxima over the vocabulary taken when the copy was made:

            |h W_v - L_v| <= |h_R - x| max|W_vR| + |x| max|W_vR - q_v s_v| + g_3 |x| max|q_v s_v|
                             + g_(|K|+1) (|x| max|q_v s_v| (1 + g_3) + |h_K| max|W_vK|) = E0,

        and |fl(L_v fl(1 / T)) - L_v / T| <= 2.5 u (|h| max|W_v| + E0) / T. The exact logit is
        taken in float64 (`sample`), whose rounding ((H + 2) 2^-53 |h| max|W_v|) is added too."""
        rows, hidden_size = hidden.shape
        padded = -(-rows // 4) * 4
        h = hidden.numpy().astype(np.float64)
        rest = h * self._keep
        top = np.abs(rest).max(1)
        r = (top / self.act_max).astype(np.float32)
        r[~(r > 0)] = 1.0  # a zero row (or no columns left): a = 0
        a = np.clip(np.rint(rest / r.astype(np.float64)[:, None]), -self.act_max, self.act_max)
        x = a * r.astype(np.float64)[:, None]
        d_rest = np.sqrt(np.square(rest - x).sum(1))
        f_rest = np.sqrt(np.square(x).sum(1))
        h_exact = h[:, self._exact_np]
        e0 = d_rest * self.rest_max + f_rest * (self.error_max + self.copy_max * _gamma(3))
        if len(self._exact_np):
            e0 = e0 + self.g_exact * (
                f_rest * self.copy_max * (1 + _gamma(3)) + np.sqrt(np.square(h_exact).sum(1)) * self.exact_max
            )
        e0 = e0 * (1 + 1e-3)  # a margin for the rounding of the norms themselves
        size = np.sqrt(np.square(h).sum(1)) * self.row_max
        e = (e0 + 2.5 * _U * (size + e0) + (hidden_size + 2) * 2.0**-53 * size) / temperature
        act = np.zeros((padded, self.width), dtype=np.int16)
        act[:rows, :hidden_size] = a
        scale = np.ones(padded, dtype=np.float32)
        scale[:rows] = r
        hk = np.zeros((padded, len(self._exact_np)), dtype=np.float32)
        hk[:rows] = hidden.numpy()[:, self._exact_np]
        return act, scale, hk, e

    def kernel_probs(
        self, act: np.ndarray, scale: np.ndarray, hk: np.ndarray, rows: int, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The C kernel's unnormalised probabilities [rows, V] (a buffer kept with the copy) and
        their block masses [rows, ceil(V / SAMPLE_BLOCK)]."""
        vocab = self.weight.shape[0]
        if self._buffers is None or self._buffers[0].shape[0] != rows:
            self._buffers = (torch.empty(rows, vocab), torch.empty(0))
        probs = self._buffers[0]
        mass = torch.empty(rows, -(-vocab // SAMPLE_BLOCK))
        code = self.kernel.sdft_int8_probs(
            self.q_packed.data_ptr(), self.scales32.data_ptr(), self.exact_padded.data_ptr(),
            act.ctypes.data, scale.ctypes.data, hk.ctypes.data, probs.data_ptr(), mass.data_ptr(),
            vocab, self.stride, self.width, len(self._exact_np), rows, SAMPLE_BLOCK,
            float(np.float32(1.0 / temperature)), torch.get_num_threads(),
        )  # fmt: skip
        if code != 0:
            raise ValueError(
                f"sdft_int8_probs kernel: bad arguments (SAMPLE_BLOCK {SAMPLE_BLOCK}, a multiple of 32, "
                f"width {self.width}, stride {self.stride})"
            )
        return probs, mass

    def approx_logits(
        self, hidden: torch.Tensor, hb: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """fp32 [B, V]: the int8 product plus the exact columns' (into `out` if given)."""
        approx = torch.ops.aten._weight_int8pack_mm(hb, self.q, self.scales)
        out = approx.float() if out is None else out.copy_(approx)
        if len(self.exact_columns):
            out.addmm_(hidden[:, self.exact_columns], self.exact_t)
        return out

    def sample(
        self,
        hidden: torch.Tensor,
        temperature: float,
        exact_head: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """One token per row of `hidden` [B, H] (fp32); `exact_head`: hidden -> fp32 logits
        (e.g. `decode_head`'s), for rows that fall back. Counts go to `PROPOSAL_STATS`: rows,
        draws, fallback rows. The approximate logits and their probabilities live in two
        [B, V] buffers kept with the copy (allocated per token they would fragment the heap,
        see `decode_head`)."""
        if not temperature > 0:
            raise ValueError(
                f"Int8Proposal.sample: temperature {temperature} must be > 0 (greedy keeps the fp32 head)"
            )
        if self.kernel is not None:
            return self._sample_kernel(hidden, temperature, exact_head)
        hb, e = self.bound(hidden)
        # + the rounding of fp32 exp in the proposal's probabilities (a few ulps, in log space) and
        # any underflow to zero in the kernel's fp32 / bf16 arithmetic (below 2^-126 each)
        e = e / temperature + 1e-6
        rows = hidden.shape[0]
        PROPOSAL_STATS["rows"] += rows
        self.rows += rows
        if not (np.isfinite(e).all() and e.max() <= INT8_MAX_BOUND):
            PROPOSAL_STATS["fallback_rows"] += rows
            self.fallbacks += rows
            return sample_from_logits(exact_head(hidden) / temperature)[0]
        if self._buffers is None or self._buffers[0].shape[0] != rows:
            self._buffers = (torch.empty(rows, self.weight.shape[0]), torch.empty(rows, self.weight.shape[0]))
        logits = self.approx_logits(hidden, hb, out=self._buffers[0])
        if temperature != 1.0:
            logits.div_(temperature)
        p, mass = _row_masses(logits, SAMPLE_BLOCK, self._buffers[1])
        cdf = mass.cumsum(-1)
        h = hidden.numpy()
        tokens = np.zeros(rows, dtype=np.int64)
        todo = np.ones(rows, dtype=bool)
        for _ in range(INT8_ROUNDS):
            PROPOSAL_STATS["draws"] += int(todo.sum())
            drawn = _draw(p, mass, cdf, SAMPLE_BLOCK)[0]
            ids = drawn.numpy()
            exact = np.einsum("bh,bh->b", self.weight[drawn].numpy(), h) / temperature  # fp32
            approx = logits.gather(1, drawn[:, None]).squeeze(1).numpy()
            accept = todo & (torch.rand(rows).numpy() < np.exp(exact - approx - e))
            tokens[accept] = ids[accept]
            todo &= ~accept
            if not todo.any():
                return torch.from_numpy(tokens)
        PROPOSAL_STATS["fallback_rows"] += int(todo.sum())
        self.fallbacks += int(todo.sum())
        tokens[todo] = sample_from_logits(exact_head(hidden[torch.from_numpy(todo)]) / temperature)[0].numpy()
        return torch.from_numpy(tokens)

    def _fallback(self, hidden, temperature, exact_head, todo=None) -> torch.Tensor:
        count = hidden.shape[0] if todo is None else int(todo.sum())
        PROPOSAL_STATS["fallback_rows"] += count
        self.fallbacks += count
        rows = hidden if todo is None else hidden[torch.from_numpy(todo)]
        return sample_from_logits(exact_head(rows) / temperature)[0]

    def _sample_kernel(self, hidden, temperature, exact_head) -> torch.Tensor:
        """`sample` through the C kernel: the proposal is the kernel's own fp32 probabilities p_v,
        so a drawn token is accepted with probability exp(h W_v / T - ln p_v - E / T), h W_v in
        float64 and ln p_v of the fp32 value drawn from; ln p_v >= L_v / T - 2.5 u (..) - the
        kernel exp's relative error (`kernels.EXP_MAX_REL_ERROR`, in the 1e-6 nats added)."""
        rows = hidden.shape[0]
        act, scale, hk, e = self.kernel_inputs(hidden, temperature)
        e = e + 1e-6
        PROPOSAL_STATS["rows"] += rows
        PROPOSAL_STATS["kernel_rows"] += rows
        self.rows += rows
        if not (np.isfinite(e).all() and e.max() <= INT8_MAX_BOUND):
            return self._fallback(hidden, temperature, exact_head)
        probs, mass = self.kernel_probs(act, scale, hk, rows, temperature)
        # Every round's uniform numbers at once: [round, (draw, accept), row].
        u = torch.rand(INT8_ROUNDS, 2, rows).numpy()
        tokens = np.empty(rows, dtype=np.int64)
        h, weight = hidden.float().contiguous(), self.weight.contiguous()  # (no copies in a rollout)
        draws = self.kernel.sdft_int8_draw(
            probs.data_ptr(), mass.data_ptr(), weight.data_ptr(), h.data_ptr(), e.ctypes.data,
            u.ctypes.data, rows, self.weight.shape[0], hidden.shape[1], SAMPLE_BLOCK, INT8_ROUNDS,
            float(temperature), float(MIN_ROW_MASS), tokens.ctypes.data,
        )  # fmt: skip
        if draws == -1:  # some row's mass is not finite or too small (see `_row_masses`)
            return self._fallback(hidden, temperature, exact_head)
        if draws < 0:
            raise ValueError(f"sdft_int8_draw kernel: bad arguments ({rows} rows, temperature {temperature})")
        PROPOSAL_STATS["draws"] += int(draws)
        todo = tokens < 0
        if todo.any():
            tokens[todo] = self._fallback(hidden, temperature, exact_head, todo).numpy()
        return torch.from_numpy(tokens)


def int8_proposal_enabled(shape: tuple[int, int], kernel_simd: str | None, capability: str) -> bool:
    """Whether a plain, contiguous fp32 CPU head of `shape` [V, H] samples through `Int8Proposal`
    (for plain temperature sampling without log-probs): a head of at least `LARGE_HEAD_MIN_BYTES`
    whose copy (V x H bytes) fits `INT8_COPY_MAX_BYTES`, and a proposal measured faster than the
    fp32 head on this CPU (`INT8_TORCH_CPUS`): the C kernel on a vector path (`kernel_simd`, the
    build's `kernels.simd()`, None without one), else PyTorch's int8 product on a PyTorch vector
    path (`capability`, `cpu_capability()`). A pure function of these, never a timing."""
    vocab, hidden = shape
    if not INT8_PROPOSAL or vocab * hidden * 4 < LARGE_HEAD_MIN_BYTES or vocab * hidden > INT8_COPY_MAX_BYTES:
        return False
    if kernel_simd is not None:
        return kernel_simd != "scalar C"
    return capability in INT8_TORCH_CPUS and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _kernel_simd() -> str | None:
    """The C kernel's vector path as `Int8Proposal` would use it (None: PyTorch's int8 product)."""
    return kernels.simd() if INT8_C_KERNEL else None


def _int8_head(model) -> torch.Tensor | None:
    """The model's head weight where `int8_proposal_enabled` says it samples through the proposal
    (a plain, contiguous fp32 CPU head), else None."""
    weight = output_head(model).linear_weight
    if weight is None or weight.device.type != "cpu" or not weight.is_contiguous():
        return None
    return weight if int8_proposal_enabled(tuple(weight.shape), _kernel_simd(), cpu_capability()) else None


def int8_proposal(model) -> Int8Proposal | None:
    """The `Int8Proposal` for this model's head where `_int8_head` says so. The copy is kept for
    the next rollout while the weight is unchanged, and given up (until the weight changes) once
    more than half of the rows it sampled since it was made fell back to the fp32 head (hidden
    states whose error bound is too large to sample from it): that follows from the hidden
    states, so the same seed still gives the same tokens."""
    weight = _int8_head(model)
    if weight is None:
        return None
    if _INT8_HEADS and _INT8_HEADS[0][0]() is weight and _INT8_HEADS[0][1] == weight._version:
        proposal = _INT8_HEADS[0][2]
        if proposal is not None and proposal.fallbacks > proposal.rows / 2:
            _INT8_HEADS[0] = (*_INT8_HEADS[0][:2], None)  # not worth its memory for this head
            proposal = None
    else:
        _INT8_HEADS.clear()
        proposal = Int8Proposal(weight.detach())
        proposal = proposal if proposal.usable else None
        # Dropped with the weight (the parameter itself, not a detached view): a model freed
        # later does not stay resident through the copy's reference to its storage.
        _INT8_HEADS.append((weakref.ref(weight, lambda _: _INT8_HEADS.clear()), weight._version, proposal))
    return proposal


MERGED_LORA_MAX_BYTES = 256 * 2**20


@contextlib.contextmanager
def merged_lora(model):
    """While sampling: every plain LoRA linear layer (fp32 base weight, vanilla LoRA) runs as one
    matmul with W + scaling * B A, computed once per rollout, instead of three matmuls and PEFT's
    per-call bookkeeping; a decode step of a small model is mostly such per-call overhead. The
    model's weights are not touched (the merged weights are new tensors, dropped afterwards), so
    nothing drifts across steps. Skipped when the merged copies would exceed
    `MERGED_LORA_MAX_BYTES` or any LoRA layer is not plain (quantized base, DoRA, ...)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # no PEFT: nothing to merge
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    plain = all(
        type(m) is LoraLinear
        and type(m.base_layer) is nn.Linear
        and m.base_layer.weight.dtype == torch.float32
        and not m.merged
        and not m.disable_adapters
        and not any(a in m.lora_variant for a in m.active_adapters)
        for m in layers
    )
    if not layers or not plain or sum(m.base_layer.weight.nbytes for m in layers) > MERGED_LORA_MAX_BYTES:
        yield
        return
    with torch.no_grad():
        for m in layers:
            weight = m.base_layer.weight + sum(
                m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A
            )
            m.forward = lambda x, w=weight, b=m.base_layer.bias: F.linear(x, w, b)
            m.sdft_merged = (weight, m.base_layer.bias)  # for `decode.plain_linear`
    try:
        yield
    finally:
        for m in layers:
            del m.forward  # back to the class's forward
            del m.sdft_merged


# Decode steps by `decode.LeanDecoder` on CPU where it supports the model. Measured on the 2-core
# CPU, 4 rows x 128 tokens, the bench's 2-layer model with a 152k head: 0.91 -> 0.74 s per rollout,
# the same tokens; its fused step (merged LoRA, plain fp32 weights): decode steps 0.101 -> 0.074 s
# of the rollout (Intel Xeon), and that step as one C call (`decode.CStep`): 0.072 -> 0.021 s.
# Not enabled on GPU: not measured there yet.
LEAN_DECODE = True

TINY_DECODE_STEP_FLOPS = 50e6


def _tiny_decode_step(decoder, rows: int, device: torch.device) -> bool:
    """Whether one decode step's decoder work (2 x rows x non-embedding weights) is so small, on
    CPU, that waking a second thread for each of its tiny matmuls costs more than it splits. The
    output head, which reads a large weight, keeps every thread. Measured on the 2-core CPU, 4 rows
    x 128 tokens, a 0.5M-weight decoder with a 152k head: 0.94 -> 0.75 s per rollout with
    OMP_WAIT_POLICY=PASSIVE (threads sleep between ops), no change with OpenMP's default policy."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        return False
    embed = decoder.get_input_embeddings().weight.numel()
    weights = sum(p.numel() for p in decoder.parameters()) - embed
    return 2 * rows * weights < TINY_DECODE_STEP_FLOPS


class _OneThread(contextlib.AbstractContextManager):
    """Runs its block with one intra-op thread when `active` (restores the count after)."""

    def __init__(self, active: bool):
        self.active, self.threads = active, torch.get_num_threads()

    def __enter__(self):
        if self.active:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.threads)


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
    logprobs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample `num_samples` completions per left-padded prompt row.

    Returns (completion ids [B * num_samples, T], log-probs of each sampled token under the
    warped distribution [B * num_samples, T], or None with `logprobs=False`); rows are grouped
    per prompt (repeat_interleave order). Tokens after a row's first EOS are `pad_id` (log-prob
    0); T stops early when all rows have finished. Without log-probs, top-k and top-p, tokens
    after the first may be drawn through `Int8Proposal` (same distribution, see there).
    """
    from transformers import DynamicCache

    device = prompt_ids.device
    rows = prompt_ids.shape[0] * num_samples
    decoder, head = causal_lm(model).get_decoder(), decode_head(model, rows)
    one_thread = _OneThread(_tiny_decode_step(decoder, rows, device))
    proposal = None
    if not (greedy or logprobs or top_k or top_p < 1.0):
        proposal = int8_proposal(model)
    cache = DynamicCache()
    out = decoder(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        past_key_values=cache,
        use_cache=True,
    )
    # The first token too comes from the proposal where there is one: the fp32 head (and its
    # transposed copy, see `decode_head`) is then needed only for rows that fall back.
    last = out.last_hidden_state[:, -1]
    logits, pending = (None, last.float().contiguous()) if proposal is not None else (head(last), None)
    cache = out.past_key_values
    mask = prompt_mask
    if num_samples > 1:  # one prefill per prompt, its KV cache copied for each sample
        cache.batch_repeat_interleave(num_samples)
        if proposal is not None:
            pending = pending.repeat_interleave(num_samples, 0)
        else:
            logits = logits.repeat_interleave(num_samples, 0)
        mask = mask.repeat_interleave(num_samples, 0)
    next_pos = mask.sum(-1, keepdim=True)  # positions count real tokens only (left padding)
    lean = None
    if LEAN_DECODE and device.type == "cpu" and LeanDecoder.supports(decoder, mask.shape[1] + max_new_tokens):
        lean = LeanDecoder(decoder, cache, mask, next_pos, max_new_tokens)
        cache = out = None  # the prefill's keys and values now live in the lean cache
    eos = torch.tensor(eos_ids, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens, logps, probs = [], [], None
    for step in range(max_new_tokens):
        if pending is not None:
            tok = proposal.sample(pending, temperature, head)
            lp = None
        elif greedy:
            tok = logits.argmax(-1)
            lp = torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
        else:
            # The logits are this loop's own (the head's buffer, or the prefill's): divided in place.
            warped = warp_logits(
                logits.div_(temperature) if temperature != 1.0 else logits, 1.0, top_k, top_p
            )
            if probs is None or probs.shape != warped.shape or probs.stride() != warped.stride():
                probs = torch.empty_like(warped, dtype=torch.float32)  # the same layout, reused
            tok, lp = sample_from_logits(warped, out=probs)
        tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        if logprobs:
            logps.append(torch.where(finished, torch.zeros_like(lp), lp))
        finished |= torch.isin(tok, eos)
        if finished.all() or step == max_new_tokens - 1:
            break
        if lean is not None:
            with one_thread:
                hidden = lean.step(tok)
        else:
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=device)], dim=1)
            with one_thread:
                out = decoder(
                    input_ids=tok[:, None],
                    attention_mask=mask,
                    position_ids=next_pos + step,
                    past_key_values=cache,
                    use_cache=True,
                )
            hidden, cache = out.last_hidden_state[:, -1], out.past_key_values
        if proposal is not None:
            pending = hidden.float()
        else:
            logits = head(hidden)
    return torch.stack(tokens, 1), torch.stack(logps, 1) if logprobs else None


def rollout_paths(
    model,
    rows: int,
    total_length: int,
    *,
    logprobs: bool = True,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> dict:
    """The paths `sample_completions` takes for `model`, as the rollout runs it (inside
    `merged_lora`), with `rows` rows (prompts x samples), `total_length` columns (prompt + new
    tokens) and these sampling settings; every entry a fixed rule of the CPU and the model:

    - "cpu_capability": PyTorch's vector path (`cpu_capability`; "" off CPU);
    - "kernel_simd": the C kernels' vector path (`kernels.simd()`), None where none builds;
    - "head_layout": "transposed", "vocab_major" or "linear" (`head_layout`), or "module"
      (any other head, used as it is);
    - "int8_proposal": whether tokens are drawn through `Int8Proposal` (until a head whose rows
      mostly fall back gives it up, see `int8_proposal`);
    - "lean_decode": "c_step", "fused", "modules" (`decode.LeanDecoder.path`) or "generic";
    - "merged_lora": whether the LoRA layers run merged (`merged_lora`);
    - "one_thread_decode": whether decode steps run on one thread (`_tiny_decode_step`).

    Nothing is sampled; the LoRA merge is computed once, as a rollout computes it."""
    device = next(model.parameters()).device
    decoder, on_cpu = causal_lm(model).get_decoder(), device.type == "cpu"
    weight = output_head(model).linear_weight
    draws_plain = not (greedy or logprobs or top_k or top_p < 1.0)
    with merged_lora(model):
        merged = any(hasattr(m, "sdft_merged") for m in model.modules())
        lean = "generic"
        if LEAN_DECODE and on_cpu:
            lean = LeanDecoder.path(decoder, total_length, device)
    return {
        "cpu_capability": cpu_capability() if on_cpu else "",
        "kernel_simd": kernels.simd() if on_cpu else None,
        "head_layout": "module" if weight is None or weight.device.type != "cpu" else head_layout(weight),
        "int8_proposal": draws_plain and _int8_head(model) is not None,
        "lean_decode": lean,
        "merged_lora": merged,
        "one_thread_decode": _tiny_decode_step(decoder, rows, device),
    }

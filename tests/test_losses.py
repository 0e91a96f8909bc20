"""Tests for sdft_lite.losses: chunked == naive == TRL's loss functions, and flat memory in vocab size."""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sdft_lite.losses import (
    LossSpec,
    aggregate_loss,
    chunked_distillation_loss,
    naive_distillation_loss,
    rows_per_chunk,
    topk_indices,
)

with warnings.catch_warnings():  # TRL flags experimental imports; here it is only a numerical oracle
    warnings.simplefilter("ignore")
    from trl.experimental.sdft import loss_utils as trl_loss

N, H, V = 37, 16, 300
# A budget small enough for several chunks of 7 to 17 rows (depending on the spec), the last one partial.
TINY_BUDGET_MB = 0.08

SPECS = {
    "forward": LossSpec(divergence="forward"),
    "reverse": LossSpec(divergence="reverse"),
    "jsd_0.3": LossSpec(divergence="jsd", alpha=0.3),
    "jsd_0.5": LossSpec(divergence="jsd", alpha=0.5),
    "topk_student_tail": LossSpec(support="topk", topk=20, add_tail=True),
    "topk_student_no_tail": LossSpec(support="topk", topk=20, add_tail=False),
    "topk_teacher_tail": LossSpec(support="topk", topk=20, topk_source="teacher"),
    "topk_teacher_jsd_no_tail": LossSpec(
        divergence="jsd", support="topk", topk=20, topk_source="teacher", add_tail=False
    ),
    "topk_jsd_tail": LossSpec(divergence="jsd", alpha=0.5, support="topk", topk=20),  # SDPO's default
    "sampled": LossSpec(divergence="reverse", support="sampled"),
    "is_clip": LossSpec(divergence="forward", is_clip=2.0),
    "is_clip_sampled": LossSpec(divergence="reverse", support="sampled", is_clip=2.0),
}


class CountingHead(nn.Module):
    """A softcapped lm_head (Gemma-style, so not a bare Linear) that records the rows of each call."""

    def __init__(self, hidden: int, vocab: int, cap: float = 30.0) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            self.linear.weight.mul_(5.0)  # logits std ~3: peaked distributions, unlike near-uniform init
        self.cap = cap
        self.rows_seen: list[int] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.rows_seen.append(h.shape[0])
        return self.cap * torch.tanh(self.linear(h) / self.cap)


def _inputs(seed: int = 0, n: int = N):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = CountingHead(H, V)
    student_hidden = torch.randn(n, H, generator=g).requires_grad_()
    teacher_hidden = student_hidden.detach() + 0.7 * torch.randn(n, H, generator=g)
    target_ids = torch.randint(0, V, (n,), generator=g)
    upstream = torch.rand(n, generator=g)  # random per-token weights: checks each token's gradient
    return head, student_hidden, teacher_hidden, target_ids, upstream


def _old_logprobs(head, student_hidden, target_ids, seed: int = 1):
    """Rollout log-probs off by ~N(0, 0.7) in log space, so some ratios pass the cap of 2 and some do not."""
    with torch.no_grad():
        logp = torch.log_softmax(head(student_hidden).float(), -1).gather(-1, target_ids[:, None]).squeeze(-1)
    return logp + 0.7 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(SPECS))
def test_chunked_equals_naive(name):
    spec = dataclasses.replace(SPECS[name], chunk_budget_mb=TINY_BUDGET_MB)
    rows = rows_per_chunk(V, spec)
    assert 3 <= math.ceil(N / rows) and N % rows != 0  # several chunks, the last one partial
    head, hs, ht, ids, upstream = _inputs()
    old = _old_logprobs(head, hs, ids) if spec.is_clip else None

    head.rows_seen.clear()
    chunked = chunked_distillation_loss(hs, ht, head, head, ids, spec, old_logprobs=old)
    # The heads really ran chunk by chunk: a 1-row probe for V, then each chunk once per side.
    assert len(head.rows_seen) == 1 + 2 * math.ceil(N / rows)
    assert max(head.rows_seen) <= rows and sum(head.rows_seen) == 1 + 2 * N
    grads_chunked = torch.autograd.grad((chunked.per_token_loss * upstream).sum(), [hs, head.linear.weight])

    naive = naive_distillation_loss(head(hs), head(ht), ids, spec, old_logprobs=old)
    grads_naive = torch.autograd.grad((naive.per_token_loss * upstream).sum(), [hs, head.linear.weight])

    assert chunked.per_token_loss.shape == (N,)
    torch.testing.assert_close(chunked.per_token_loss, naive.per_token_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked.student_logprobs, naive.student_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.teacher_logprobs, naive.teacher_logprobs, atol=1e-5, rtol=1e-5)
    assert not chunked.student_logprobs.requires_grad and not chunked.teacher_logprobs.requires_grad
    for got, want in zip(grads_chunked, grads_naive, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(SPECS))
def test_frozen_head_fused_path_equals_naive(name):
    """frozen_head=True: grads computed in forward (no recompute) equal the naive autograd ones."""
    spec = dataclasses.replace(SPECS[name], chunk_budget_mb=TINY_BUDGET_MB)
    rows = rows_per_chunk(V, spec)
    head, hs, ht, ids, upstream = _inputs(seed=3)
    head.requires_grad_(False)
    old = _old_logprobs(head, hs, ids) if spec.is_clip else None

    head.rows_seen.clear()
    fused = chunked_distillation_loss(hs, ht, head, head, ids, spec, old_logprobs=old, frozen_head=True)
    (grad_fused,) = torch.autograd.grad((fused.per_token_loss * upstream).sum(), [hs])
    # Each chunk's logits were computed once per side and never again in backward.
    assert len(head.rows_seen) == 1 + 2 * math.ceil(N / rows)

    naive = naive_distillation_loss(head(hs), head(ht), ids, spec, old_logprobs=old)
    (grad_naive,) = torch.autograd.grad((naive.per_token_loss * upstream).sum(), [hs])
    torch.testing.assert_close(fused.per_token_loss, naive.per_token_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused.student_logprobs, naive.student_logprobs, atol=1e-5, rtol=1e-5)
    assert grad_naive.abs().max() > 0
    torch.testing.assert_close(grad_fused, grad_naive, atol=1e-5, rtol=1e-4)


class _CausalLM(nn.Module):
    """What models.output_head reads: a causal LM's `lm_head` and config (softcap or none)."""

    def __init__(self, lm_head: nn.Module, softcap: float | None = None) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.config = type("Config", (), {"final_logit_softcapping": softcap})()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def _trainer_head(lm_head: nn.Module, softcap: float | None = None):
    """The head as the trainer passes it to the loss (models.output_head)."""
    from sdft_lite.models import output_head

    return output_head(_CausalLM(lm_head, softcap))


TILED_PATH_SPECS = {
    **{name: SPECS[name] for name in ("forward", "is_clip", "topk_student_tail", "topk_student_no_tail",
                                      "topk_teacher_tail")},
    # top-k = the whole vocabulary: the support holds all the mass, so the tail's log-mass is
    # clamped (no gradient through the tail), the branch real top-100 supports hit rarely.
    "topk_all_tail": LossSpec(support="topk", topk=V, add_tail=True),
}  # fmt: skip


def _softmax_tile_kernel():
    import sdft_lite.tiled_loss as tiled

    lib = tiled._softmax_kernel(torch.zeros(1))
    if lib is None:  # CI has gcc: there the kernel is tested, never skipped
        pytest.skip("no C compiler here: the tiled loss's softmax runs as PyTorch ops")
    return lib


def _spy_tiled(monkeypatch) -> list:
    """Records each call of the vocabulary-tiled loss (which still runs): which path was taken."""
    import sdft_lite.tiled_loss as tiled

    calls, real = [], tiled.vocab_tiled_loss

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(tiled, "vocab_tiled_loss", spy)
    return calls


@pytest.mark.parametrize("kernel", [True, False])  # the C softmax-tile kernel; PyTorch ops
@pytest.mark.parametrize("group_rows", [1024, 16])  # one row group; three, the last one partial
@pytest.mark.parametrize("name", list(TILED_PATH_SPECS))
def test_vocab_tiled_path_equals_naive(name, group_rows, kernel, monkeypatch):
    """Forward KL (full vocabulary or top-k) with one frozen fp32 linear head for both sides (the
    self-teacher, the default on CPU) streams the head in vocabulary tiles with the gradient in
    closed form: values and gradients equal the naive autograd ones, with each tile's softmax
    step in the C kernel or in PyTorch."""
    import sdft_lite.tiled_loss as tiled

    if kernel:
        _softmax_tile_kernel()
    monkeypatch.setattr(tiled, "SOFTMAX_C_KERNEL", kernel)
    assert (tiled._softmax_kernel(torch.zeros(1)) is not None) == kernel
    spec = dataclasses.replace(TILED_PATH_SPECS[name], chunk_budget_mb=TINY_BUDGET_MB)
    monkeypatch.setattr(tiled, "GROUP_ROWS", group_rows)
    buffers = 1 if spec.support == "full" else 2  # full vocabulary: probabilities in place
    tile = tiled._tile_columns(min(N, group_rows), V, int(TINY_BUDGET_MB * 2**20), buffers)
    assert tile < V and V % tile != 0  # several vocabulary tiles, the last one partial
    g = torch.Generator().manual_seed(5)
    lm = nn.Linear(H, V, bias=False).requires_grad_(False)
    with torch.no_grad():
        lm.weight.copy_(torch.randn(V, H, generator=g))  # peaked distributions
    head = t_head = _trainer_head(lm)
    assert head.linear_weight is lm.weight
    hs = torch.randn(N, H, generator=g).requires_grad_()
    ht = hs.detach() + 0.7 * torch.randn(N, H, generator=g)
    ids = torch.randint(0, V, (N,), generator=g)
    upstream = torch.rand(N, generator=g)
    old = _old_logprobs(head, hs, ids) if spec.is_clip else None

    calls = _spy_tiled(monkeypatch)
    fast = chunked_distillation_loss(hs, ht, head, t_head, ids, spec, old_logprobs=old, frozen_head=True)
    assert len(calls) == 1  # the path under test is taken
    (grad_fast,) = torch.autograd.grad((fast.per_token_loss * upstream).sum(), [hs])
    naive = naive_distillation_loss(head(hs), t_head(ht), ids, spec, old_logprobs=old)
    (grad_naive,) = torch.autograd.grad((naive.per_token_loss * upstream).sum(), [hs])
    torch.testing.assert_close(fast.per_token_loss, naive.per_token_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.student_logprobs, naive.student_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.teacher_logprobs, naive.teacher_logprobs, atol=1e-5, rtol=1e-5)
    assert grad_naive.abs().max() > 0
    torch.testing.assert_close(grad_fast, grad_naive, atol=1e-5, rtol=1e-4)


SEPARATE_TEACHER_SPECS = ("forward", "topk_student_tail", "topk_teacher_tail", "reverse", "is_clip")


@pytest.mark.parametrize("frozen_head", [True, False])
@pytest.mark.parametrize("name", SEPARATE_TEACHER_SPECS)
def test_separate_teacher_of_another_hidden_size(name, frozen_head, monkeypatch):
    """teacher.model: a frozen fp32 linear head of its own over hidden states of another width
    (student 32, teacher 48, one vocabulary). The tiles, which run both sides through one head,
    are not taken; the row chunks give the naive loss and gradient."""
    spec = dataclasses.replace(SPECS[name], chunk_budget_mb=TINY_BUDGET_MB)
    g = torch.Generator().manual_seed(11)
    lm_s, lm_t = (nn.Linear(h, V, bias=False).requires_grad_(False) for h in (32, 48))
    with torch.no_grad():
        lm_s.weight.copy_(torch.randn(V, 32, generator=g) * 0.5)
        lm_t.weight.copy_(torch.randn(V, 48, generator=g) * 0.5)
    head, t_head = _trainer_head(lm_s), _trainer_head(lm_t)
    assert head.linear_weight is not None and t_head.linear_weight is not None  # both plain fp32 heads
    hs = torch.randn(N, 32, generator=g).requires_grad_()
    ht = torch.randn(N, 48, generator=g)
    ids = torch.randint(0, V, (N,), generator=g)
    upstream = torch.rand(N, generator=g)
    old = _old_logprobs(head, hs, ids) if spec.is_clip else None

    calls = _spy_tiled(monkeypatch)
    out = chunked_distillation_loss(
        hs, ht, head, t_head, ids, spec, old_logprobs=old, frozen_head=frozen_head
    )
    assert not calls
    (grad,) = torch.autograd.grad((out.per_token_loss * upstream).sum(), [hs])
    naive = naive_distillation_loss(head(hs), t_head(ht), ids, spec, old_logprobs=old)
    (grad_naive,) = torch.autograd.grad((naive.per_token_loss * upstream).sum(), [hs])
    torch.testing.assert_close(out.per_token_loss, naive.per_token_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.teacher_logprobs, naive.teacher_logprobs, atol=1e-5, rtol=1e-5)
    assert grad_naive.abs().max() > 0
    torch.testing.assert_close(grad, grad_naive, atol=1e-5, rtol=1e-4)


BF16_SPECS = ("forward", "reverse", "jsd_0.5", "topk_student_tail", "sampled", "is_clip")


@pytest.mark.parametrize("frozen_head", [True, False])
@pytest.mark.parametrize("name", BF16_SPECS)
def test_bf16_head_softmax_runs_in_fp32(name, frozen_head):
    """16-bit heads (GPU): each chunk's logits are cast to fp32 before the log-softmax. The loss
    equals the naive one on the same bf16 logits upcast to fp32, and is far from the loss with
    the log-softmax in bf16 (the cast matters at this size: logits ~ +-10, vocabulary 300)."""
    from sdft_lite.losses import _token_losses

    spec = dataclasses.replace(SPECS[name], chunk_budget_mb=TINY_BUDGET_MB)
    g = torch.Generator().manual_seed(13)
    lm = nn.Linear(H, V, bias=False).requires_grad_(False)
    with torch.no_grad():
        lm.weight.copy_(torch.randn(V, H, generator=g))
    lm = lm.to(torch.bfloat16)
    head = _trainer_head(lm)
    assert head.linear_weight is None  # not an fp32 head: no tiles
    hs = torch.randn(N, H, generator=g).to(torch.bfloat16).requires_grad_()
    ht = (hs.detach().float() + 0.7 * torch.randn(N, H, generator=g)).to(torch.bfloat16)
    ids = torch.randint(0, V, (N,), generator=g)
    old = _old_logprobs(head, hs, ids) if spec.is_clip else None

    out = chunked_distillation_loss(hs, ht, head, head, ids, spec, old_logprobs=old, frozen_head=frozen_head)
    for t in (out.per_token_loss, out.student_logprobs, out.teacher_logprobs):
        assert t.dtype == torch.float32
    (grad,) = torch.autograd.grad(out.per_token_loss.sum(), [hs])
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all() and grad.abs().max() > 0
    with torch.no_grad():
        s_logits, t_logits = head(hs), head(ht)  # bf16 [N, V]
        ref = naive_distillation_loss(s_logits.float(), t_logits.float(), ids, spec, old_logprobs=old)
        in_bf16, _, _ = _token_losses(s_logits, t_logits, ids, spec)  # the log-softmax left in bf16
    torch.testing.assert_close(out.per_token_loss, ref.per_token_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.student_logprobs, ref.student_logprobs, atol=1e-5, rtol=1e-5)
    if not spec.is_clip:  # the weights multiply both sides alike
        assert (in_bf16.float() - ref.per_token_loss).abs().max() > 100 * 1e-5


@pytest.mark.parametrize("cols", [736, 37])  # 16-wide steps and a scalar tail
def test_candidate_scan_kernel_equals_the_mask_and_its_indices(cols):
    """`sdft_above` gives the first `room` (row, column) entries above each row's threshold in
    row-major order, as `source > threshold` and `nonzero_static` do, with the source's and the
    other side's values there (a NaN is above nothing); with more than the room it says so
    (room + 1) and stops."""
    from sdft_lite.tiled_loss import _first_indices

    lib = _softmax_tile_kernel()
    g = torch.Generator().manual_seed(4)
    rows = 40
    x, other = torch.randn(rows, cols + 3, generator=g), torch.randn(rows, cols, generator=g)
    source = x[:, :cols]  # rows cols + 3 apart
    source[0, 5], source[1, cols - 1] = float("nan"), float("nan")
    values = torch.randn(rows, 8, generator=g).abs() + 1.5  # thresholds: the last column, rows 8 apart
    values[2, -1] = float("-inf")  # a row whose every entry is a candidate
    threshold = values[:, -1:]
    want = _first_indices(source > threshold, rows * cols)
    want = want[want[:, 0] >= 0]
    assert len(want) > cols  # row 2's entries and a few from every other row
    for room in (len(want) + 5, len(want), 7):
        bufs = [torch.full((room,), -1, dtype=torch.long) for _ in range(2)]
        bufs += [torch.zeros(room) for _ in range(2)]
        n = lib.sdft_above(
            source.data_ptr(), rows, cols, source.stride(0), threshold.data_ptr(), values.stride(0), room,
            *(b.data_ptr() for b in bufs[:2]), other.data_ptr(), other.stride(0), *(b.data_ptr() for b in bufs[2:]),
        )  # fmt: skip
        assert n == (len(want) if room >= len(want) else room + 1)
        got = min(n, room)
        assert torch.equal(torch.stack(bufs[:2], 1)[:got], want[:got])
        row, col = want[:got].t()
        assert torch.equal(bufs[2][:got], source[row, col]) and torch.equal(bufs[3][:got], other[row, col])


@pytest.mark.parametrize("cols", [736, 37])  # 8- and 16-wide steps; a scalar tail
def test_softmax_tile_kernel_equals_the_pytorch_ops(cols):
    """`sdft_softmax_tile` against the online-softmax step it replaces, over two tiles: the row
    maxima, the rescale of earlier sums (0 on the first tile, exactly 1 where the maximum did not
    grow, which the returned count says), exp and sums; a row with a NaN (wherever it sits in the
    vector steps or the scalar tail) or an infinite logit, and one of -inf only, get NaN sums as
    PyTorch's ops give them."""
    lib = _softmax_tile_kernel()
    g = torch.Generator().manual_seed(3)
    rows = 300  # over 65,536 entries at 736 columns: split over the threads
    m, z = torch.full((rows, 1), float("-inf")), torch.zeros(rows, 1)
    m_ref, z_ref = m.clone(), z.clone()
    for tile in range(2):
        x = torch.randn(rows, cols, generator=g) * 8 - 4 * tile  # the second tile's maxima mostly stay
        # NaNs in the first and second 8 of a 16-wide step and in the scalar tail
        x[0, 5], x[1, 3], x[2] = float("nan"), float("inf"), float("-inf")
        x[3, 13], x[4, cols - 1] = float("nan"), float("nan")
        probs, rescale = torch.empty(rows, cols), torch.empty(rows, 1)
        grew = lib.sdft_softmax_tile(
            x.data_ptr(), probs.data_ptr(), m.data_ptr(), z.data_ptr(), rescale.data_ptr(), rows, cols, 2
        )
        m_new = torch.maximum(m_ref, x.amax(-1, keepdim=True))
        rescale_ref, probs_ref = (m_ref - m_new).exp(), (x - m_new).exp()
        z_ref = z_ref * rescale_ref + probs_ref.sum(-1, keepdim=True)
        assert grew == int((m_new > m_ref)[5:].sum()) + 5  # + the rows with NaN sums (0 to 4)
        torch.testing.assert_close(m, m_new, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(z, z_ref, rtol=1e-6, atol=0, equal_nan=True)
        assert z[:5].isnan().all()
        finite = slice(5, None)
        torch.testing.assert_close(rescale[finite], rescale_ref[finite], rtol=3e-7, atol=0)
        torch.testing.assert_close(probs[finite], probs_ref[finite], rtol=3e-7, atol=1e-38)
        if tile == 0:
            assert (rescale[finite] == 0).all() and grew == rows
        else:
            kept = (m_new == m_ref)[finite]
            assert 5 < grew < rows // 2 and (rescale[finite][kept] == 1).all()
        m_ref = m_new


def _amx_kl_kernel():
    """The compiled `sdft_kl_amx`, or a skip where this CPU (or this kernel) has no AMX bf16 tiles."""
    from sdft_lite import kernels

    lib = _softmax_tile_kernel()
    if not kernels.amx_bf16():
        pytest.skip("no AMX bf16 tiles here: the loss's head products run in fp32")
    return lib


def _kl_amx(lib, x, w, n, k=0, grad=True, threads=2):
    """sdft_kl_amx on teacher rows x[:n] and student rows x[n:]: (m, z, g, the student's and the
    teacher's logits on the support, its ids, the return code)."""
    rows, hidden = x.shape
    m, z = torch.empty(rows), torch.empty(rows)
    g = torch.empty(rows if k == 0 else rows - n, hidden) if grad else None
    top_s, top_t = (torch.empty(rows - n, k), torch.empty(rows - n, k)) if k else (None, None)
    ids = torch.empty(rows - n, k, dtype=torch.long) if k else None
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    code = lib.sdft_kl_amx(
        x.data_ptr(), w.data_ptr(), m.data_ptr(), z.data_ptr(), ptr(g), ptr(top_s), ptr(top_t), ptr(ids),
        n, rows - n, hidden, w.shape[0], k, threads,
    )  # fmt: skip
    return m, z, g, (top_s, top_t), ids, code


# bf16x3's error per product term (the lo x lo term and the rounding of the lo parts, each at most
# 2^-18 |a| |b|) and fp32 sums over H terms: a bound on each logit's error, from float64.
def _bf16x3_logit_bound(x, w):
    return (3 * 2.0**-18 + x.shape[1] * 2.0**-24) * (x.double().abs() @ w.double().abs().t())


@pytest.mark.parametrize("hidden, threads", [(64, 1), (128, 2)])
def test_amx_kl_kernel_full_vocabulary_against_float64(hidden, threads):
    """`sdft_kl_amx`, the full vocabulary: each row's log-sum-exp and E_p[W] (g / z) against
    float64 within what bf16x3 products allow (`_bf16x3_logit_bound`), for tiles of 512 ids with a
    partial last one, row blocks of 32 with partial ones for both sides, and the threads' merge;
    the sums' reference m is within 30 below the row's largest logit; logits that grow along the
    vocabulary by more than that move it."""
    lib = _amx_kl_kernel()
    g = torch.Generator().manual_seed(11)
    vocab, n_t = 1500, 37  # 3 tiles (the last one 476 ids); 37 teacher + 37 student rows
    w = torch.randn(vocab, hidden, generator=g) * 0.3
    w[:, 0] = torch.linspace(-2, 2, vocab)
    x = torch.randn(2 * n_t, hidden, generator=g) * 2
    x[0, 0] = 40.0  # teacher row 0's logits rise by 160 over the vocabulary: the reference moves
    m, z, gsum, _, _, code = _kl_amx(lib, x, w, n_t, threads=threads)
    assert code == 0
    logits = x.double() @ w.double().t()
    bound = _bf16x3_logit_bound(x, w).amax(-1)
    top = logits.amax(-1)
    assert ((m.double() <= top + bound) & (m.double() >= top - 30)).all()  # the sums' reference (KL_LAG)
    lse = torch.logsumexp(logits, -1)
    err = (m.double() + z.double().log() - lse).abs()
    assert (err <= bound + 1e-6).all() and err.max() > 0  # not fp64 by accident
    p = torch.softmax(logits, -1)
    want = p @ w.double()
    scale = p @ w.double().abs()  # E_p[|W|]
    got = gsum.double() / z.double()[:, None]
    assert ((got - want).abs() <= (4 * bound[:, None] + 2.0**-14) * scale + 1e-7).all()


@pytest.mark.parametrize("tail", [True, False])
def test_amx_kl_kernel_topk_support_against_float64(tail):
    """`sdft_kl_amx` with a top-k support of the student rows: k distinct ids per row that are the
    float64 top-k (any swap is between logits within twice the error bound of each other), both
    sides' fp32 logits on them, both sides' log-sum-exp, and the student's sum of p_v W_v over the ids outside the
    support (each id counted once, whichever thread's tile and whichever merge it went through);
    with logits that grow along the vocabulary (every tile raises the threshold) and a row of
    equal logits (ties)."""
    lib = _amx_kl_kernel()
    g = torch.Generator().manual_seed(12)
    vocab, hidden, n, k = 2100, 64, 40, 50
    w = torch.randn(vocab, hidden, generator=g) * 0.3
    w[:, 0] = torch.linspace(-3, 3, vocab)  # a trend along the vocabulary for rows with x[:, 0] > 0
    x = torch.randn(2 * n, hidden, generator=g)
    x[n + 1] = 0.0  # every logit 0: ties everywhere
    m, z, gsum, (top_s, top_t), ids, code = _kl_amx(lib, x, w, n, k=k, grad=tail)
    assert code == 0 and (gsum is not None) == tail
    logits = x.double() @ w.double().t()
    bound = _bf16x3_logit_bound(x, w).amax(-1)
    lse = torch.logsumexp(logits, -1)
    assert ((m.double() + z.double().log() - lse).abs() <= bound + 1e-6).all()
    s_logits, s_bound = logits[n:], bound[n:]
    assert ((ids >= 0) & (ids < vocab)).all()
    assert all(len(set(row.tolist())) == k for row in ids)  # k distinct ids per row
    kth = s_logits.topk(k, dim=-1).values[:, -1:]
    assert (s_logits.gather(1, ids) >= kth - 2 * s_bound[:, None]).all()
    top = s_logits.topk(k + 1, dim=-1).values
    exact = top[:, k - 1] - top[:, k] > 2 * s_bound
    assert exact.sum() > n // 2  # most rows have a clear k-th: there the support is exactly float64's
    for r in exact.nonzero().flatten().tolist():
        assert set(ids[r].tolist()) == set(s_logits[r].topk(k).indices.tolist())
    # both sides' logits on the support in fp32 (H terms: at most H 2^-24 of sum |x w| off)
    fp32 = x.shape[1] * 2.0**-24 * (x.double().abs() @ w.double().abs().t())
    for got, side, rows in ((top_s, logits[n:], slice(n, None)), (top_t, logits[:n], slice(0, n))):
        assert ((got.double() - side.gather(1, ids)).abs() <= fp32[rows].gather(1, ids) + 1e-7).all()
    if tail:
        e = (s_logits - m[n:].double()[:, None]).exp().scatter(1, ids, 0.0)  # exp(l - m) off the support
        want, scale = e @ w.double(), e @ w.double().abs()
        assert ((gsum.double() - want).abs() <= (4 * s_bound[:, None] + 2.0**-14) * scale + 1e-6).all()


def test_amx_kl_kernel_hands_rows_that_are_not_finite_back():
    """A NaN or infinite hidden state or head weight, or a top-k row with fewer than k logits
    above -inf: the kernel says how many (the loss then takes the fp32 tiles, whose arithmetic
    gives what PyTorch's does); bad shapes: -1."""
    lib = _amx_kl_kernel()
    g = torch.Generator().manual_seed(13)
    w, x = torch.randn(700, 32, generator=g), torch.randn(6, 32, generator=g)
    assert _kl_amx(lib, x, w, 3)[-1] == 0
    bad_x = x.clone()
    bad_x[4, 7] = float("nan")
    assert _kl_amx(lib, bad_x, w, 3)[-1] > 0
    bad_w = w.clone()
    bad_w[650, 3] = float("inf")  # in the second tile
    assert _kl_amx(lib, x, bad_w, 3, k=5)[-1] > 0
    assert (
        _kl_amx(lib, torch.randn(6, 48, generator=g), torch.randn(700, 48, generator=g), 3)[-1] == -1
    )  # H % 32
    assert _kl_amx(lib, x, w[:4], 3, k=5)[-1] == -1  # k > vocab
    # finite inputs whose logit overflows to -inf: a top-k row with fewer than k ids above -inf
    big_x, small_w = torch.zeros(2, 32), torch.full((4, 32), 0.1)
    big_x[1, 0], small_w[0, 0] = 1e30, -1e9
    assert _kl_amx(lib, big_x, small_w, 1, k=3)[-1] == 0
    assert _kl_amx(lib, big_x, small_w, 1, k=4)[-1] > 0


@pytest.mark.parametrize("name", ["forward", "topk_student_tail", "topk_student_no_tail"])
def test_vocab_tiled_amx_path_equals_naive(name, monkeypatch):
    """With the self-teacher and H a multiple of 32, the tiled loss's pass runs in `sdft_kl_amx`
    (bf16x3 head products): loss, log-probs and gradient equal the naive fp32 autograd ones within
    bf16x3's error, and `head_precision: fp32` keeps the fp32 tiles."""
    import sdft_lite.tiled_loss as tiled

    _amx_kl_kernel()
    taken = []
    real = tiled._amx_tiles
    monkeypatch.setattr(tiled, "_amx_tiles", lambda *a: taken.append(real(*a)) or taken[-1])
    hidden, vocab, n = 64, 1300, 45
    g = torch.Generator().manual_seed(14)
    lm = nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    with torch.no_grad():
        lm.weight.copy_(torch.randn(vocab, hidden, generator=g) * 0.5)
    head = _trainer_head(lm)
    hs = torch.randn(n, hidden, generator=g).requires_grad_()
    ht = hs.detach() + 0.7 * torch.randn(n, hidden, generator=g)
    ids = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.rand(n, generator=g)
    naive = naive_distillation_loss(head(hs), head(ht), ids, SPECS[name])
    (grad_naive,) = torch.autograd.grad((naive.per_token_loss * upstream).sum(), [hs])
    for precision in ("auto", "fp32"):
        spec = dataclasses.replace(SPECS[name], head_precision=precision)
        taken.clear()
        fast = chunked_distillation_loss(hs, ht, head, head, ids, spec, frozen_head=True)
        (grad_fast,) = torch.autograd.grad((fast.per_token_loss * upstream).sum(), [hs])
        assert (taken[0] is not None) == (precision == "auto")
        tol = dict(atol=2e-4, rtol=2e-4) if precision == "auto" else dict(atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fast.per_token_loss, naive.per_token_loss, **tol)
        torch.testing.assert_close(fast.student_logprobs, naive.student_logprobs, **tol)
        torch.testing.assert_close(fast.teacher_logprobs, naive.teacher_logprobs, **tol)
        torch.testing.assert_close(grad_fast, grad_naive, **tol)


def test_running_topk_keeps_the_k_largest_of_each_row_over_tiles():
    """The tiled loss's top-k support: the same entries as torch.topk over the whole row, with the
    other side's values at the same ids, for tiles of any width (ties included); and every entry a
    tile offered is either in the final support or handed back exactly once, so the sum over the
    ids outside the support counts each of them once."""
    from sdft_lite.tiled_loss import _RunningTopK

    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 500, generator=g) * 3).round()  # few distinct values: many ties
    x[2] = torch.linspace(-5, 5, 500)  # rising: every tile holds more than k entries above the threshold
    other = torch.randn(6, 500, generator=g)
    for tile, k in [(37, 20), (500, 20), (7, 30), (64, 500), (16, 3)]:
        top = _RunningTopK(6, k, x.dtype, x.device, source_is_student=False)
        offered = torch.zeros(6, 500, dtype=torch.int)
        dropped = torch.zeros(6, 500, dtype=torch.int)
        for start in range(0, 500, tile):
            rows, cols = top.offer(x[:, start : start + tile], other[:, start : start + tile], start)
            offered[rows, cols + start] += 1
            assert top._queued.max() < 2 * k  # bounded: a row queues at most k a tile, merged at k
            if top.full() or start + tile >= 500:
                out = top.merge()
                if out is not None:
                    assert torch.equal(out[0], out[0].sort().values)  # sorted by row
                    assert torch.equal(out[2], other[out[0], out[1]])  # the student's (other side's) logits
                    dropped[out[0], out[1]] += 1
        assert all(len(set(row)) == k for row in top.ids.tolist())  # k distinct ids per row
        torch.testing.assert_close(
            top.values.sort(-1).values, x.topk(k, dim=-1).values.sort(-1).values, rtol=0, atol=0
        )
        assert torch.equal(x.gather(-1, top.ids), top.values)
        assert torch.equal(other.gather(-1, top.ids), top.other)
        final = torch.zeros(6, 500, dtype=torch.int).scatter_(1, top.ids, 1)
        assert offered.max() <= 1 and torch.equal(offered, final + dropped)


def test_running_topk_offer_allocates_its_mask_not_an_index_per_candidate():
    """A tile whose every entry beats the threshold (logits rising along the vocabulary) hands
    back each row's top-k, and allocates its bool mask, the fixed room of indices and k entries
    per row: not the 16 bytes of (row, column) indices per candidate a plain `nonzero` would."""
    from sdft_lite.tiled_loss import _RunningTopK

    rows, cols, k = 64, 4096, 8
    x = torch.linspace(-1.0, 1.0, 2 * cols).expand(rows, -1).contiguous()
    top = _RunningTopK(rows, k, x.dtype, x.device, source_is_student=True)
    top.offer(x[:, :cols], x[:, :cols], 0)
    top.merge()  # thresholds now from the first tile: the whole second tile is above them
    with LiveTensorBytes() as mem:
        row, col = top.offer(x[:, cols:], x[:, cols:], cols)
    assert torch.equal(torch.bincount(row, minlength=rows), torch.full((rows,), k))
    assert torch.equal(col.view(rows, k).sort(-1).values, torch.arange(cols - k, cols).expand(rows, -1))
    room = rows * min(k, _RunningTopK.ROOM_PER_ROW) * 2 * 8
    per_row = rows * k * (8 + 8 + 8 + 4 + 4 + 1)  # top-k indices, rows, ids, values, other, masks
    assert mem.peak <= rows * cols + room + per_row + 64 * 1024
    assert mem.peak < rows * cols * 16 / 4  # what a `nonzero` over the mask would have taken


def test_output_head_exposes_only_plain_linear_weights():
    assert _trainer_head(nn.Linear(H, V, bias=False)).linear_weight is not None
    # the softcap must be applied
    assert _trainer_head(nn.Linear(H, V, bias=False), softcap=30.0).linear_weight is None
    assert _trainer_head(nn.Linear(H, V, bias=True)).linear_weight is None
    assert _trainer_head(nn.Linear(H, V, bias=False).to(torch.bfloat16)).linear_weight is None


def test_no_gradient_reaches_the_teacher():
    head, hs, ht, ids, _ = _inputs()
    ht.requires_grad_()
    spec = LossSpec(chunk_budget_mb=TINY_BUDGET_MB)
    out = chunked_distillation_loss(hs, ht, head, head, ids, spec)
    g_student, g_teacher = torch.autograd.grad(out.per_token_loss.sum(), [hs, ht], allow_unused=True)
    assert g_teacher is None and g_student.abs().max() > 0


# --- naive == TRL's loss functions (the oracle), on [1, N, V] logits ------------------------------


def _logits(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(N, V, generator=g)).requires_grad_()
    teacher = student.detach() + 2 * torch.randn(N, V, generator=g)
    return student, teacher, torch.randint(0, V, (N,), generator=g), torch.rand(N, generator=g)


def _assert_matches_trl(spec, trl_fn, old=None):
    """naive(spec) equals trl_fn(student_3d, teacher_3d) in values and in d/d student_logits."""
    s, t, ids, upstream = _logits()
    ours = naive_distillation_loss(s, t, ids, spec, old_logprobs=old(s, ids) if old else None).per_token_loss
    ref = trl_fn(s.view(1, N, V), t.view(1, N, V), ids).reshape(N)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    (g_ours,) = torch.autograd.grad((ours * upstream).sum(), s)
    (g_ref,) = torch.autograd.grad((ref * upstream).sum(), s)
    assert g_ref.abs().max() > 0
    torch.testing.assert_close(g_ours, g_ref, atol=1e-6, rtol=1e-4)


TRL_ALPHA = {
    "forward": (LossSpec(divergence="forward"), 0.0),
    "reverse": (LossSpec(divergence="reverse"), 1.0),
}
TRL_ALPHA |= {f"jsd_{a}": (LossSpec(divergence="jsd", alpha=a), a) for a in (0.3, 0.5, 0.0, 1.0)}


@pytest.mark.parametrize("name", list(TRL_ALPHA))
def test_full_vocab_matches_trl(name):
    spec, alpha = TRL_ALPHA[name]
    _assert_matches_trl(
        spec,
        lambda s, t, ids: trl_loss.compute_full_logit_self_distillation_loss(s, t, distillation_alpha=alpha),
    )


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("name", ["forward", "reverse", "jsd_0.3"])
def test_student_topk_matches_trl(name, add_tail):
    base, alpha = TRL_ALPHA[name]
    spec = dataclasses.replace(base, support="topk", topk=20, add_tail=add_tail)
    _assert_matches_trl(
        spec,
        lambda s, t, ids: trl_loss.compute_topk_self_distillation_loss(
            s, t, distillation_topk=20, distillation_alpha=alpha, distillation_add_tail=add_tail
        ),
    )


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("name", ["forward", "reverse", "jsd_0.3"])
def test_teacher_topk_matches_trl_with_roles_swapped(name, add_tail):
    # TRL takes top-k of its first argument. Passing (teacher, student) with alpha -> 1 - alpha gives
    # the same divergence with the teacher's top-k as support: the generalized JSD is symmetric
    # under swapping the two distributions together with alpha <-> 1 - alpha.
    base, alpha = TRL_ALPHA[name]
    spec = dataclasses.replace(base, support="topk", topk=20, add_tail=add_tail, topk_source="teacher")
    _assert_matches_trl(
        spec,
        lambda s, t, ids: trl_loss.compute_topk_self_distillation_loss(
            t, s, distillation_topk=20, distillation_alpha=1.0 - alpha, distillation_add_tail=add_tail
        ),
    )


def test_sampled_token_matches_trl():
    _assert_matches_trl(
        LossSpec(divergence="reverse", support="sampled"),
        lambda s, t, ids: trl_loss.compute_sampled_token_self_distillation_loss(
            s, t, ids.view(1, N), distillation_alpha=1.0
        ),
    )


def test_importance_clipping_matches_trl():
    def old(s, ids):
        logp = torch.log_softmax(s.detach().reshape(N, V), -1).gather(-1, ids[:, None]).squeeze(-1)
        shifted = logp + 0.7 * torch.randn(N, generator=torch.Generator().manual_seed(3))
        ratio = (logp - shifted).exp()
        assert (ratio > 2).any() and (ratio < 2).any()  # the cap is active on some tokens only
        return shifted

    def trl_fn(s, t, ids):
        loss = trl_loss.compute_full_logit_self_distillation_loss(s, t, distillation_alpha=0.0)
        logp = torch.log_softmax(s, -1).gather(-1, ids.view(1, N, 1)).squeeze(-1)
        return trl_loss.apply_importance_sampling_clipping(loss, logp, old(s, ids).view(1, N), 2.0)

    _assert_matches_trl(LossSpec(divergence="forward", is_clip=2.0), trl_fn, old=old)


def test_topk_larger_than_vocab_without_tail_is_full_vocab():
    s, t, ids, _ = _logits()
    topk = naive_distillation_loss(s, t, ids, LossSpec(support="topk", topk=10 * V, add_tail=False))
    full = naive_distillation_loss(s, t, ids, LossSpec(support="full"))
    torch.testing.assert_close(topk.per_token_loss, full.per_token_loss, atol=1e-5, rtol=1e-4)


# --- properties and errors ---------------------------------------------------------------------


def test_forward_kl_is_zero_for_identical_teacher_and_positive_otherwise():
    head, hs, ht, ids, _ = _inputs()
    spec = LossSpec(chunk_budget_mb=TINY_BUDGET_MB)
    same = chunked_distillation_loss(hs, hs.detach(), head, head, ids, spec).per_token_loss
    assert same.abs().max() < 1e-5
    different = chunked_distillation_loss(hs, ht, head, head, ids, spec).per_token_loss
    assert (different > 1e-4).all()


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_sampled_support_needs_reverse_kl(divergence):
    with pytest.raises(ValueError, match="sampled.*reverse"):
        LossSpec(divergence=divergence, support="sampled")


def test_spec_reports_all_problems_at_once():
    with pytest.raises(ValueError, match="alpha.*topk.*is_clip"):
        LossSpec(alpha=1.5, topk=0, is_clip=0.0)


def test_is_clip_without_old_logprobs_raises():
    head, hs, ht, ids, _ = _inputs()
    spec = LossSpec(is_clip=2.0)
    with pytest.raises(ValueError, match="old_logprobs"):
        chunked_distillation_loss(hs, ht, head, head, ids, spec)
    with pytest.raises(ValueError, match="old_logprobs"):
        naive_distillation_loss(head(hs), head(ht), ids, spec)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"ht": torch.zeros(N - 1, H)}, "teacher"),
        ({"ids": torch.zeros(N + 1, dtype=torch.long)}, "target_ids"),
        ({"hs": torch.zeros(1, N, H)}, "2-D"),
        ({"old": torch.zeros(N, 1)}, "old_logprobs"),
    ],
)
def test_shape_mismatch_raises(bad, match):
    head, hs, ht, ids, _ = _inputs()
    args = {"hs": hs, "ht": ht, "ids": ids, "old": None} | bad
    with pytest.raises(ValueError, match=match):
        chunked_distillation_loss(args["hs"], args["ht"], head, head, args["ids"], LossSpec(), args["old"])


def test_float_target_ids_raise():
    head, hs, ht, ids, _ = _inputs()
    with pytest.raises(TypeError, match="integer"):
        chunked_distillation_loss(hs, ht, head, head, ids.float(), LossSpec())


def test_empty_batch_gives_empty_outputs_and_a_zero_loss_that_backprops():
    head, hs, ht, ids, _ = _inputs(n=0)
    out = chunked_distillation_loss(hs, ht, head, head, ids, LossSpec())
    assert out.per_token_loss.shape == out.student_logprobs.shape == out.teacher_logprobs.shape == (0,)
    loss = aggregate_loss(out.per_token_loss, torch.zeros(0, dtype=torch.long), num_seqs=2)
    assert loss.item() == 0.0
    loss.backward()  # connected to the head, so DDP ranks with no tokens still reduce a (zero) grad
    assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().max() == 0


def test_aggregate_is_mean_per_sequence_then_mean_over_non_empty_sequences():
    per_token = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0], requires_grad=True)
    seq_index = torch.tensor([0, 0, 0, 2, 2])  # sequence 1 has no tokens and is left out
    loss = aggregate_loss(per_token, seq_index, num_seqs=3)
    assert loss.item() == pytest.approx(((1 + 2 + 3) / 3 + (4 + 10) / 2) / 2)  # 4.5, not the token mean 4.0
    loss.backward()
    torch.testing.assert_close(per_token.grad, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 4, 1 / 4]))


def test_aggregate_rejects_out_of_range_sequence_ids():
    with pytest.raises(ValueError, match="num_seqs"):
        aggregate_loss(torch.ones(3), torch.tensor([0, 1, 2]), num_seqs=2)


# --- memory: the loss's peak does not grow with the vocabulary ---------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages allocated (and still alive) while the mode is active.

    Counts every op output, forward and backward (the CPU autograd engine runs on this thread),
    and frees a storage's bytes when its Python object dies. Tensors made before entering the
    mode, such as the head weight, are not counted: this is the memory of the loss itself.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._finalizers: dict[int, weakref.finalize] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: not a new allocation.
        inputs = {
            id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                if id(storage) not in self._finalizers and id(storage) not in inputs:
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    self._finalizers[id(storage)] = weakref.finalize(
                        storage, self._free, id(storage), storage.nbytes()
                    )
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._finalizers.pop(key, None)


def _peak_loss_bytes(
    vocab: int, tokens: int, spec: LossSpec, chunked: bool = True, trainer_head: bool = False
) -> int:
    """Peak bytes the loss allocates in forward + backward on a frozen [vocab, 64] lm_head.

    `trainer_head`: the head as the trainer passes it (models.output_head of a plain linear
    lm_head, frozen_head=True), which takes the vocabulary-tiled path for forward KL."""
    g = torch.Generator().manual_seed(0)
    lm_head = nn.Linear(64, vocab, bias=False).requires_grad_(False)  # frozen, as an lm_head under LoRA
    head = _trainer_head(lm_head) if trainer_head else lm_head
    hs = torch.randn(tokens, 64, generator=g).requires_grad_()
    ht = torch.randn(tokens, 64, generator=g)
    ids = torch.randint(0, vocab, (tokens,), generator=g)
    old = torch.randn(tokens, generator=g) - 10 if spec.is_clip else None
    with LiveTensorBytes() as mem:
        if chunked:
            out = chunked_distillation_loss(
                hs, ht, head, head, ids, spec, old_logprobs=old, frozen_head=trainer_head
            )
        else:
            out = naive_distillation_loss(head(hs), head(ht), ids, spec, old_logprobs=old)
        out.per_token_loss.mean().backward()
    assert hs.grad is not None and hs.grad.abs().max() > 0
    return mem.peak


MIB = 2**20


# One spec per distinct [rows, V] code path (is_clip only touches [N]-sized tensors).
@pytest.mark.parametrize(
    "name", ["forward", "reverse", "jsd_0.3", "topk_student_tail", "topk_teacher_jsd_no_tail", "sampled"]
)
def test_loss_peak_memory_fits_the_chunk_budget(name):
    # rows_per_chunk's count of live [rows, V] tensors per spec is what makes the budget true.
    spec = dataclasses.replace(SPECS[name], chunk_budget_mb=4.0)
    vocab = 20_000
    rows = rows_per_chunk(vocab, spec)
    peak = _peak_loss_bytes(vocab, 2 * rows + 3, spec)
    assert rows * vocab * 4 <= peak  # the tracker does see the chunk's fp32 logits
    assert peak <= spec.chunk_budget_mb * MIB + 0.25 * MIB  # slack for the O(N * H) tensors


@pytest.mark.parametrize("name", ["forward", "topk_student_tail"])
def test_trainer_default_loss_peak_memory_fits_the_chunk_budget(name):
    """The path training takes by default (forward KL, plain fp32 lm_head, gradient in forward):
    vocabulary tiles whose buffers fit the budget, and at most TILE_BYTES whatever the budget,
    the vocabulary or the number of tokens."""
    import sdft_lite.tiled_loss as tiled

    spec = dataclasses.replace(SPECS[name], chunk_budget_mb=4.0, head_precision="fp32")
    vocab, tokens = 20_000, 29
    peak = _peak_loss_bytes(vocab, tokens, spec, trainer_head=True)
    buffers = 1 if spec.support == "full" else 2  # full, one head: the probabilities overwrite the logits
    tile = tiled._tile_columns(tokens, vocab, int(spec.chunk_budget_mb * MIB), buffers)
    assert tile < vocab and buffers * (2 * tokens) * tile * 4 <= peak  # the tracker sees the tile buffers
    assert peak <= spec.chunk_budget_mb * MIB + 0.25 * MIB
    for precision in ("fp32", "auto"):
        default = dataclasses.replace(SPECS[name], chunk_budget_mb=128.0, head_precision=precision)
        for vocab, tokens in [(151_936, 256), (32_000, 1024)]:
            assert _peak_loss_bytes(vocab, tokens, default, trainer_head=True) <= tiled.TILE_BYTES + 0.5 * MIB


@pytest.mark.parametrize("name", ["forward", "topk_student_tail"])
def test_amx_loss_memory_fits_the_budget(name, monkeypatch):
    """The AMX pass (`sdft_kl_amx`) allocates in C what the tracker cannot see: `sdft_kl_amx_bytes`
    says how much, the loss counts it in its budget (a budget below it keeps the fp32 tiles), and
    with the PyTorch tensors the pass makes it stays within the budget and flat in the vocabulary."""
    import sdft_lite.tiled_loss as tiled

    lib = _amx_kl_kernel()
    taken = []
    real = tiled._amx_tiles
    monkeypatch.setattr(tiled, "_amx_tiles", lambda *a: taken.append(real(*a)) or taken[-1])
    k = SPECS[name].topk if SPECS[name].support == "topk" else 0
    for vocab, tokens, budget_mb in [(20_000, 29, 4.0), (151_936, 256, 128.0), (32_000, 1024, 128.0)]:
        spec = dataclasses.replace(SPECS[name], chunk_budget_mb=budget_mb)
        c_bytes = lib.sdft_kl_amx_bytes(tokens, tokens, 64, k, torch.get_num_threads())
        taken.clear()
        peak = _peak_loss_bytes(vocab, tokens, spec, trainer_head=True)
        assert taken and taken[0] is not None
        assert 0 < c_bytes and peak + c_bytes <= min(budget_mb * MIB, tiled.TILE_BYTES) + 0.5 * MIB
    spec = dataclasses.replace(
        SPECS[name], chunk_budget_mb=lib.sdft_kl_amx_bytes(29, 29, 64, k, torch.get_num_threads()) / MIB * 0.9
    )
    taken.clear()
    _peak_loss_bytes(20_000, 29, spec, trainer_head=True)
    assert taken == [None]  # over the budget: the fp32 tiles


def test_loss_peak_memory_does_not_grow_with_vocab_or_tokens():
    spec = LossSpec(
        chunk_budget_mb=64.0
    )  # full-vocab forward KL; a budget that gives several chunks at both sizes
    small, large = 32_000, 151_936
    assert rows_per_chunk(small, spec) < 256  # several chunks at both vocab sizes
    chunked_small = _peak_loss_bytes(small, 256, spec)
    chunked_large = _peak_loss_bytes(large, 256, spec)
    chunked_long = _peak_loss_bytes(small, 1024, spec)
    assert chunked_large <= 1.5 * chunked_small + 1 * MIB
    assert chunked_long <= 1.5 * chunked_small + 1 * MIB
    assert max(chunked_small, chunked_large, chunked_long) <= spec.chunk_budget_mb * MIB + 1 * MIB

    # Control, so a blind tracker cannot pass: the full-tensor version grows with vocab
    # (V ratio 4.7) and, at half the tokens, holds several times the chunked peak.
    naive_small = _peak_loss_bytes(small, 128, spec, chunked=False)
    naive_large = _peak_loss_bytes(large, 128, spec, chunked=False)
    assert naive_large >= 4 * naive_small
    assert naive_large >= 3 * chunked_large


@pytest.mark.parametrize("vocab", [64 * 50, 64 * 50 + 17])  # whole blocks; a partial last block
@pytest.mark.parametrize("ties", [False, True])
def test_two_stage_topk_picks_the_same_entries_as_topk(vocab, ties):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, vocab, generator=g)
    if ties:  # few distinct values: many equal entries around the k-th largest
        x = (x * 2).round()
    x[0, -3:] = 100.0  # top entries in the partial block (or the last whole one)
    k = 40
    idx = topk_indices(x, k, block=8)
    ref = x.topk(k, dim=-1)
    assert idx.shape == (9, k) and all(len(set(row)) == k for row in idx.tolist())  # k distinct ids
    # Same values (the same entries up to which of several equal values is taken).
    torch.testing.assert_close(x.gather(-1, idx).sort(-1).values, ref.values.sort(-1).values, rtol=0, atol=0)
    if not ties:
        assert torch.equal(idx.sort(-1).values, ref.indices.sort(-1).values)

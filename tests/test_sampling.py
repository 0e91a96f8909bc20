"""The built-in sampler draws from the same distribution as the reference (torch.multinomial /
transformers' generate), and its greedy path and log-probs match an unpadded forward."""

from __future__ import annotations

import contextlib
import ctypes
import platform

import numpy as np
import pytest
import torch
from conftest import build_model
from scipy import stats

from sdft_lite.config import GenerationConfig
from sdft_lite.prompts import left_pad
from sdft_lite.rollout import generate_rollouts
from sdft_lite.sampling import sample_completions, sample_from_logits, warp_logits

V = 60
DRAWS = 60_000


def _logits(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, V, generator=g) * 2.0  # peaked: the largest token holds a few % to ~30 %


def _counts(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens.flatten(), minlength=V).double()


def _in_layout(logits: torch.Tensor, layout: str) -> torch.Tensor:
    """The same [B, V] logits, stored row-major or vocabulary-major (as decode_head's
    "vocab_major" head returns them: a transposed view of [V, B] storage)."""
    return logits.contiguous() if layout == "row_major" else logits.t().contiguous().t()


@pytest.mark.parametrize("layout", ["row_major", "vocab_major"])
@pytest.mark.parametrize("block", [2048, 7])  # one block; 9 blocks, the last one partial (60 = 8 * 7 + 4)
@pytest.mark.parametrize(
    "warp", [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)]
)
def test_sampler_matches_reference_frequencies(warp, block, layout):
    torch.manual_seed(0)
    logits = warp_logits(_logits(), **warp)
    probs = torch.softmax(logits.double(), -1)[0]  # the exact distribution, normalised in float64
    ours = _counts(sample_from_logits(_in_layout(logits.expand(DRAWS, V), layout), block=block)[0])
    ref = _counts(torch.multinomial(probs, DRAWS, replacement=True))
    support = probs > 0
    assert ours[~support].sum() == 0, "sampled a token outside the warped support"
    # Goodness of fit to the exact distribution (bins with expected count >= 5 kept whole).
    expected = probs[support] * DRAWS
    p_fit = stats.chisquare(ours[support], expected).pvalue
    # Same distribution as torch.multinomial: a two-sample chi-square test on the contingency table.
    table = torch.stack([ours[support], ref[support]]).numpy()
    p_same = stats.chi2_contingency(table[:, table.sum(0) > 0]).pvalue
    assert p_fit > 1e-3 and p_same > 1e-3, (p_fit, p_same)


@pytest.mark.parametrize("layout", ["row_major", "vocab_major"])
@pytest.mark.parametrize("offset", [0.0, 120.0, -150.0])  # exp as it is; overflow; underflow
def test_unshifted_probabilities_fall_back_to_softmax_out_of_fp32_range(offset, layout):
    """The sampler exponentiates the logits without a max shift; a batch whose logits would
    overflow, or one row so far below zero that its mass underflows, is renormalised row by row
    instead, and still samples from the exact distribution with the exact log-probs."""
    from sdft_lite.sampling import _row_masses

    torch.manual_seed(0)
    base = _logits(3)[0]
    logits = _in_layout(torch.stack([base, base + offset]).repeat(DRAWS // 2, 1), layout)
    probs, mass = _row_masses(logits, block=7)
    normalised = bool(torch.allclose(probs.sum(-1), torch.ones(DRAWS)))
    assert normalised == (offset != 0.0)  # only the out-of-range batches take torch.softmax
    torch.testing.assert_close(probs / probs.sum(-1, keepdim=True), torch.softmax(logits, -1))
    torch.testing.assert_close(mass.sum(-1), probs.sum(-1))
    tokens, logp = sample_from_logits(logits, block=7)
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1))
    p_fit = stats.chisquare(_counts(tokens[1::2]), torch.softmax(base.double(), -1) * (DRAWS // 2)).pvalue
    assert p_fit > 1e-3, p_fit


@pytest.mark.parametrize("layout", ["row_major", "vocab_major"])
@pytest.mark.parametrize("block", [2048, 7])
def test_sampler_logprobs_are_the_warped_logprobs(block, layout):
    logits = warp_logits(_logits(1), temperature=1.0, top_k=10, top_p=1.0).expand(64, V)
    tokens, logp = sample_from_logits(_in_layout(logits, layout), block=block)
    assert torch.isfinite(logp).all()
    ref = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, ref)


def test_warping_matches_transformers_warpers():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = _logits(2).repeat(3, 1)
    ids = torch.zeros(3, 1, dtype=torch.long)
    ref = TopPLogitsWarper(0.8)(
        ids, TopKLogitsWarper(15)(ids, TemperatureLogitsWarper(0.6)(ids, logits.clone()))
    )
    ours = warp_logits(logits, 0.6, 15, 0.8)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():  # sharper random weights so greedy paths differ between prompts
        for p in model.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_greedy_matches_generate_with_padding(model_and_tok):
    model, tok = model_and_tok
    prompts = [tok("abc de")["input_ids"], tok("x")["input_ids"], tok("hello world")["input_ids"]]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    ours = generate_rollouts(
        model, ids, mask, GenerationConfig(max_new_tokens=8), eos, tok.pad_token_id, greedy=True
    )
    ref = generate_rollouts(
        model,
        ids,
        mask,
        GenerationConfig(max_new_tokens=8, engine="generate"),
        eos,
        tok.pad_token_id,
        greedy=True,
    )
    assert torch.equal(ours.lengths, ref.lengths)
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    assert len({tuple(r) for r in ours.completion_ids.tolist()}) > 1  # not a trivially constant output


def test_sampled_logprobs_match_unpadded_forward_and_samples_share_prefill(model_and_tok):
    model, tok = model_and_tok
    prompts = [tok("abc de")["input_ids"], tok("xy")["input_ids"]]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    torch.manual_seed(1)
    completion, logp = sample_completions(
        model, ids, mask, max_new_tokens=6, eos_ids=[-1], pad_id=tok.pad_token_id, num_samples=3
    )
    assert completion.shape == (6, 6)
    with torch.no_grad():
        for row in range(6):
            prompt = prompts[row // 3]  # rows are grouped per prompt
            full = torch.tensor([prompt + completion[row].tolist()])
            ref = torch.log_softmax(model(full).logits.float(), -1)[0, len(prompt) - 1 : -1]
            ref = ref.gather(-1, completion[row][:, None]).squeeze(-1)
            torch.testing.assert_close(logp[row], ref, atol=1e-4, rtol=1e-4)
    greedy, _ = sample_completions(
        model, ids, mask, max_new_tokens=6, eos_ids=[-1], pad_id=tok.pad_token_id, num_samples=3, greedy=True
    )
    assert torch.equal(greedy[0], greedy[1]) and torch.equal(greedy[1], greedy[2])


def test_merged_lora_rollout_equals_the_adapter_forward(tiny_model_dir, monkeypatch):
    """Rollouts run each plain LoRA layer as one matmul with merged weights: the same log-probs
    and greedy tokens as PEFT's own forward, the model's weights untouched, its layers restored."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sdft_lite.sampling as sampling

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
    ).eval()
    lora = [m for n, m in model.named_modules() if n.endswith("q_proj") or n.endswith("down_proj")]
    with torch.no_grad():  # a LoRA update that changes the outputs
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids, mask = left_pad([tok("abc de")["input_ids"], tok("xy")["input_ids"]], tok.pad_token_id)

    with sampling.merged_lora(model):
        assert all("forward" in m.__dict__ for m in lora)  # the merged path is the one taken
    assert not any("forward" in m.__dict__ for m in lora)

    def run(merge: bool):
        torch.manual_seed(3)
        with sampling.merged_lora(model) if merge else contextlib.nullcontext():
            return sample_completions(
                model, ids, mask, max_new_tokens=8, eos_ids=[-1], pad_id=tok.pad_token_id
            )

    merged_ids, merged_logp = run(merge=True)
    ref_ids, ref_logp = run(merge=False)  # PEFT's own forward
    assert torch.equal(merged_ids, ref_ids)
    torch.testing.assert_close(merged_logp, ref_logp, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(sampling, "MERGED_LORA_MAX_BYTES", 0)  # over the cap: nothing is merged
    with sampling.merged_lora(model):
        assert not any("forward" in m.__dict__ for m in lora)
    with model.disable_adapter():  # the adapter matters here
        base_ids, _ = run(merge=True)
    assert not torch.equal(base_ids, ref_ids)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_decode_head_copies_the_transposed_weight_at_its_first_call_only(model_and_tok):
    """The transposed layout's copy is made when the head is first called, not before, and then
    kept: a rollout whose tokens all come from the int8 proposal never pays for it."""
    import sdft_lite.sampling as sampling

    model, _ = model_and_tok
    weight = model.lm_head.weight.detach()
    head = sampling.DecodeHead(weight, "transposed", 3)
    hidden = torch.randn(3, weight.shape[1])
    assert head._copy is None
    torch.testing.assert_close(head(hidden), hidden @ weight.t(), atol=1e-5, rtol=1e-5)
    copy = head._copy
    assert copy is not None and copy.shape == (weight.shape[1], weight.shape[0])
    head(hidden)
    assert head._copy is copy


def test_decode_head_gives_the_model_logits_in_every_layout(model_and_tok, monkeypatch):
    """The decode loop's head gives the model's own logits in each matmul layout it may pick
    (transposed copy, vocabulary-major, F.linear), and without the copy above its size cap."""
    import sdft_lite.sampling as sampling
    from sdft_lite.models import output_head

    model, _ = model_and_tok
    assert output_head(model).linear_weight is not None  # a plain fp32 head
    hidden = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        ref = model.get_output_embeddings()(hidden).float()
        assert sampling.head_layout(output_head(model).linear_weight) == "transposed"  # small: fixed
        for layout in ("transposed", "vocab_major", "linear"):
            monkeypatch.setattr(sampling, "head_layout", lambda weight, layout=layout: layout)
            logits = sampling.decode_head(model, 3)(hidden)
            assert logits.shape == ref.shape and logits.is_contiguous() == (layout != "vocab_major")
            torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
        monkeypatch.undo()
        monkeypatch.setattr(sampling, "DECODE_HEAD_COPY_MAX_BYTES", 0)
        assert sampling.head_layout(output_head(model).linear_weight) == "linear"
        torch.testing.assert_close(sampling.decode_head(model, 3)(hidden), ref, atol=1e-5, rtol=1e-5)


def test_fast_path_choices_follow_the_cpu_features_and_sizes_only(monkeypatch, tmp_path):
    """`choose_head_layout` and `int8_proposal_enabled` give their documented answers for given
    CPU features and head sizes (no timing, so not this machine's): large heads vocabulary-major
    on PyTorch's AVX2 path, else the transposed copy where it fits, else "linear"; the int8
    proposal on for large heads through the C kernel's vector paths, or PyTorch's int8 product on
    its AVX2 / AVX-512 paths; and `head_layout` / `_int8_head` apply them to this machine."""
    import sdft_lite.sampling as sampling
    from sdft_lite import kernels

    small, large, huge = (1000, 64), (20_480, 128), (300_000, 128)  # 0.2 MiB, 10 MiB, 146 MiB
    assert large[0] * large[1] * 4 >= sampling.LARGE_HEAD_MIN_BYTES > small[0] * small[1] * 4
    assert huge[0] * huge[1] * 4 > sampling.DECODE_HEAD_COPY_MAX_BYTES
    layout = sampling.choose_head_layout
    for cpu in ("AVX2", "AVX512", "DEFAULT", "SVE256"):
        assert layout(small, cpu) == "transposed"  # in cache: one fixed layout everywhere
        assert layout(small, cpu, contiguous=False) == "linear"
    assert layout(large, "AVX2") == layout(huge, "AVX2") == "vocab_major"  # no copy in that layout
    for cpu in ("AVX512", "DEFAULT"):
        assert layout(large, cpu) == "transposed" and layout(huge, cpu) == "linear"
    enabled = sampling.int8_proposal_enabled
    vector_paths = set(kernels.SIMD_PATHS.values()) - {"scalar C"}
    for simd in vector_paths:
        for cpu in ("AVX2", "AVX512", "DEFAULT"):
            assert enabled(large, simd, cpu) and enabled(huge, simd, cpu)
            assert not enabled(small, simd, cpu)
    assert not enabled(large, "scalar C", "AVX2")  # measured slower than the fp32 head
    assert enabled(large, None, "AVX2") and enabled(large, None, "AVX512")  # PyTorch's int8 product
    assert not enabled(large, None, "DEFAULT") and not enabled(large, None, "SVE256")
    over_cap = (sampling.INT8_COPY_MAX_BYTES // 128 + 32, 128)
    assert not enabled(over_cap, "AVX2", "AVX2")
    monkeypatch.setattr(sampling, "INT8_PROPOSAL", False)
    assert not enabled(large, "AVX2", "AVX2")
    monkeypatch.undo()
    # this machine: the rules applied to its features, whatever they are
    model = build_model(tmp_path, vocab_size=large[0], hidden=large[1], layers=1).eval()
    weight, cpu, simd = model.lm_head.weight, sampling.cpu_capability(), kernels.simd()
    assert sampling.head_layout(weight) == layout(large, cpu)
    assert sampling.head_layout(weight.t().contiguous().t()) == layout(large, cpu, contiguous=False)
    assert (sampling._int8_head(model) is weight) == enabled(large, simd, cpu)
    paths = sampling.rollout_paths(model, 4, 16, logprobs=False)
    assert paths["head_layout"] == layout(large, cpu) and paths["int8_proposal"] == enabled(large, simd, cpu)
    assert paths["cpu_capability"] == cpu and paths["kernel_simd"] == simd
    assert not sampling.rollout_paths(model, 4, 16)["int8_proposal"]  # log-probs: the fp32 head
    monkeypatch.setattr(sampling, "INT8_C_KERNEL", False)  # PyTorch's int8 product: its own rule
    assert (sampling._int8_head(model) is weight) == enabled(large, None, cpu)


def test_tiny_decoder_steps_on_one_thread_sample_the_same(model_and_tok, monkeypatch):
    """Tiny decoders run their decode steps on one intra-op thread (the head keeps all): the same
    tokens and log-probs as with every thread, and the thread count is restored."""
    import sdft_lite.sampling as sampling

    model, tok = model_and_tok
    ids, mask = left_pad([tok("abc de")["input_ids"], tok("xy")["input_ids"]], tok.pad_token_id)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        decoder = model.get_decoder()
        assert sampling._tiny_decode_step(decoder, 2, torch.device("cpu"))  # the test model is tiny
        enter, inside = sampling._OneThread.__enter__, []

        def recording_enter(self):  # the thread count each decode step actually ran with
            enter(self)
            inside.append(torch.get_num_threads())

        monkeypatch.setattr(sampling._OneThread, "__enter__", recording_enter)
        runs = {}
        for flops in (sampling.TINY_DECODE_STEP_FLOPS, 0):
            monkeypatch.setattr(sampling, "TINY_DECODE_STEP_FLOPS", flops)
            torch.manual_seed(4)
            runs[flops] = sample_completions(
                model, ids, mask, max_new_tokens=6, eos_ids=[-1], pad_id=tok.pad_token_id
            )
            assert set(inside) == ({1} if flops else {2})
            inside.clear()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    (one_ids, one_lp), (all_ids, all_lp) = runs.values()
    assert torch.equal(one_ids, all_ids)
    torch.testing.assert_close(one_lp, all_lp, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- int8 proposal (rejection)
def _head(vocab: int, hidden: int, seed: int, outlier: bool) -> torch.Tensor:
    """A head like a small model's tied embedding; `outlier`: one constant coordinate (1.0, and
    -5.0 in two rows), as the bench's model has, which would set every row's int8 scale."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, hidden, generator=g) * 0.02
    w[3] = 0.0  # a zero row
    w[5, 7] = 0.5  # a row with one large entry
    if outlier:
        w[:, 0] = 1.0
        w[:2, 0] = -5.0
    return w


@pytest.mark.parametrize("hidden", [64, 72])  # 72: the int8 rows are padded to 96 columns
@pytest.mark.parametrize("outlier", [False, True])
def test_int8_proposal_error_bound_holds(hidden, outlier, monkeypatch):
    """|h W_v - approx_v| <= E for every row and token, with h W_v in float64, over hidden
    states from tiny to huge, one with a massive coordinate; and E is not vacuous (PyTorch's
    int8 product: the path without the C kernel)."""
    import sdft_lite.sampling as sampling

    monkeypatch.setattr(sampling, "INT8_C_KERNEL", False)
    w = _head(5000, hidden, seed=hidden, outlier=outlier)
    proposal = sampling.Int8Proposal(w)
    assert proposal.usable
    assert proposal.exact_columns.tolist() == ([0, 7] if outlier else [7])  # 7: row 5's large entry
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, hidden, generator=g) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 1e3, 1.0])[:, None]
    h[5, 0] = 300.0  # a massive activation
    hb, e = proposal.bound(h)
    error = (h.double() @ w.double().t() - proposal.approx_logits(h, hb).double()).abs()
    bound = torch.from_numpy(e)[:, None]
    assert (error <= bound).all(), (error / bound).max()
    assert (error.amax(1) / bound[:, 0] > 0.02).all()  # within ~50x of the worst error seen
    if outlier:  # the constant coordinate is exact: the bound does not grow with it
        assert e[5] < e[2] * 100


def _kernel_library():
    from sdft_lite import kernels

    lib = kernels.library()
    if lib is None:  # CI has gcc: there the kernel is tested, never skipped
        pytest.skip("no C compiler here: the int8 proposal runs through PyTorch's kernel")
    return lib


@pytest.mark.parametrize("vocab", [5000, 5003])  # the last group of 32 ids partial (5003: odd)
@pytest.mark.parametrize("hidden", [64, 72])  # 72: the int8 rows are padded to 96 columns
@pytest.mark.parametrize("outlier", [False, True])
def test_int8_kernel_probabilities_are_within_their_bound(vocab, hidden, outlier, monkeypatch):
    """The C kernel's fp32 probabilities p_v satisfy |ln p_v - h W_v / T| <= E / T (+ the 1e-6
    nats for its exp) for every row and token, h W_v in float64, over hidden states from tiny to
    huge (one with a massive coordinate), 6 rows (padded to 8 for the kernel); the block masses
    are the blocks' sums; and E is not vacuous."""
    import sdft_lite.sampling as sampling

    _kernel_library()
    monkeypatch.setattr(sampling, "SAMPLE_BLOCK", 512)  # 2 chunks of 256 per block
    w = _head(vocab, hidden, seed=hidden, outlier=outlier)
    proposal = sampling.Int8Proposal(w)
    assert proposal.kernel is not None and proposal.usable
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, hidden, generator=g) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 1e3, 1.0])[:, None]
    h[5, 0] = 300.0  # a massive activation
    for temperature in (1.0, 0.7):
        act, scale, hk, e = proposal.kernel_inputs(h, temperature)
        probs, mass = proposal.kernel_probs(act, scale, hk, 6, temperature)
        exact = (h.double() @ w.double().t()) / temperature
        finite = (
            probs > 0
        ) & probs.isfinite()  # rows whose logits reach exp's range (row 4's tokens underflow or overflow)
        error = (probs.double().log() - exact).abs().where(finite, torch.zeros(()))
        bound = torch.from_numpy(e + 1e-6)[:, None]
        assert (error <= bound).all(), (error / bound).max()
        assert (error.amax(1)[:4] / bound[:4, 0] > 0.02).all()  # within ~50x of the worst error seen
        sums = torch.nn.functional.pad(probs.double(), (0, -vocab % 512)).view(6, -1, 512).sum(-1)
        torch.testing.assert_close(mass.double()[:4], sums[:4], rtol=1e-5, atol=0)
    if outlier:  # the constant coordinate is exact: the bound does not grow with it
        assert e[5] < e[2] * 100


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="builds the x86-64 vector paths (-mno-avx512f, -march=x86-64): x86-64 CPUs only",
)
@pytest.mark.parametrize(
    "flags, paths",
    [
        (("-mno-avx512f",), {"AVX2", "AVX2 + AVX-VNNI"}),  # on an AVX-512 CPU: the AVX2 path
        (("-mno-avx512f", "-mno-avxvnni"), {"AVX2"}),
        (("-march=x86-64",), {"scalar C"}),  # no AVX2: the scalar C path
        # on a CPU with AMX (this build's path, if Linux grants the tiles): the AVX-512 path
        (
            ("-mno-amx-tile", "-mno-amx-int8"),
            {"AVX-512 VNNI", "AVX-512BW", "AVX2", "AVX2 + AVX-VNNI", "scalar C"},
        ),
    ],
)
@pytest.mark.parametrize("rows", [6, 21])  # 21: AMX takes two blocks of rows (16, then 5 padded to 8)
def test_int8_kernel_vector_paths_agree(flags, paths, rows, monkeypatch, tmp_path):
    """Every vector path of the int8 kernel (built here with the other paths' flags) gives the
    same probabilities as this machine's own build, bit for bit (exact integer sums, the same fp32
    operations per lane), and the same block masses up to the order of their sums."""
    import sdft_lite.sampling as sampling
    from sdft_lite import kernels

    native = _kernel_library()
    found = kernels._compiler()
    built = kernels._build(found[0], tmp_path / "variant.so", extra_flags=flags)
    assert built is not None
    variant = kernels._bind(ctypes.CDLL(str(built)))
    assert kernels.SIMD_PATHS[variant.sdft_simd()] in paths
    monkeypatch.setattr(sampling, "SAMPLE_BLOCK", 512)
    w = _head(5003, 72, seed=4, outlier=True)  # 5003: a partial last group; 72: rows padded to 96
    h = torch.randn(rows, 72, generator=torch.Generator().manual_seed(5)) * 3.0
    h[0] *= 1e3  # activations up to the int16 limit: every byte of the AMX path's split in use
    results = []
    for lib in (native, variant):
        monkeypatch.setattr(kernels, "_LIBRARY", [lib])
        proposal = sampling.Int8Proposal(w)
        act, scale, hk, _ = proposal.kernel_inputs(h, 0.7)
        assert np.abs(act).max() == proposal.act_max and (act < 0).any()
        results.append([t.clone() for t in proposal.kernel_probs(act, scale, hk, rows, 0.7)])
    (probs, mass), (probs_v, mass_v) = results
    assert torch.equal(probs, probs_v)
    torch.testing.assert_close(mass_v, mass, rtol=1e-5, atol=0)


@pytest.mark.parametrize("hidden", [64, 72])  # 72: the int8 rows are padded to 96 columns
@pytest.mark.parametrize("outlier", [False, True])
def test_int8_kernel_inputs_match_their_reference(hidden, outlier):
    """`sdft_int8_inputs` gives `kernel_inputs_reference`'s int16 activations, scales and exact
    columns bit for bit, and its bound up to the order of the sums, over hidden states from tiny
    to huge (7 rows: padded to 8); a row with a NaN or an infinity gets a NaN bound."""
    import sdft_lite.sampling as sampling

    _kernel_library()
    proposal = sampling.Int8Proposal(_head(5000, hidden, seed=hidden, outlier=outlier))
    g = torch.Generator().manual_seed(7)
    h = torch.randn(7, hidden, generator=g) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 1e3, 1.0, 0.0])[:, None]
    h[5, 0] = 300.0  # a massive activation
    for temperature in (1.0, 0.7):
        ours, ref = proposal.kernel_inputs(h, temperature), proposal.kernel_inputs_reference(h, temperature)
        for a, b in zip(ours[:3], ref[:3], strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
        np.testing.assert_allclose(ours[3], ref[3], rtol=1e-12, atol=0)
        assert np.isfinite(ours[3]).all() and (ours[3][:6] > 0).all()
    h[2, 3], h[4, 0] = float("nan"), float("inf")  # column 0 is exact with the outlier
    e = proposal.kernel_inputs(h, 1.0)[3]
    assert np.isnan(e[[2, 4]]).all() and np.isfinite(np.delete(e, [2, 4])).all()


def _draw_reference(probs, mass, weight, h, e, u, block, temperature):
    """`sdft_int8_draw` in NumPy: per round, each row without a token draws by the two-level
    inverse CDF (float32 cumulative sums, the guards against an empty block or token) with
    u[round, 0], and accepts when u[round, 1] < exp(h . W_v / T - ln p_v - e); -1: none accepted."""
    rows = probs.shape[0]
    cdf = np.cumsum(mass, axis=1)
    tokens, draws = np.full(rows, -1), 0
    for round_u in u:
        for b in np.flatnonzero(tokens < 0):
            draws += 1
            x = round_u[0, b] * cdf[b, -1]
            k = min(int(np.searchsorted(cdf[b], x, side="right")), mass.shape[1] - 1)
            if mass[b, k] <= 0:
                k = int(np.flatnonzero(mass[b] > 0)[-1])
            inner = probs[b, k * block : (k + 1) * block]
            target = max(x - (cdf[b, k] - mass[b, k]), 0)
            j = min(int(np.searchsorted(np.cumsum(inner), target, side="right")), len(inner) - 1)
            if inner[j] <= 0:
                j = int(np.flatnonzero(inner > 0)[-1])
            v = k * block + j
            exact = weight[v].astype(np.float64) @ h[b].astype(np.float64) / temperature
            if round_u[1, b] < np.exp(exact - np.log(np.float64(probs[b, v])) - e[b]):
                tokens[b] = v
    return tokens, draws


@pytest.mark.parametrize("rounds", [8, 1])
def test_int8_kernel_draws_match_their_reference(rounds, monkeypatch):
    """`sdft_int8_draw` picks the ids, the acceptances and the draw count of its NumPy reference
    for the same uniform numbers: blocks of 64 over 400 ids (the last partial), 21 rows whose
    bound is large enough that some draws are rejected (and, with one round, some rows get no
    token); a row whose mass is zero makes it hand the whole batch back (-1)."""
    import sdft_lite.sampling as sampling

    lib = _kernel_library()
    monkeypatch.setattr(sampling, "SAMPLE_BLOCK", 64)
    w = _head(400, 64, seed=3, outlier=True)
    proposal = sampling.Int8Proposal(w)
    g = torch.Generator().manual_seed(6)
    h = torch.randn(21, 64, generator=g) * 15.0  # peaked rows, and a bound of ~0.2-0.4 nats
    h[:, 0] = 11.0  # the constant coordinate: within exp's range (the kernel's exp is unshifted)
    for temperature in (1.0, 0.7):
        act, scale, hk, e = proposal.kernel_inputs(h, temperature)
        e = e + 1e-6
        probs, mass = proposal.kernel_probs(act, scale, hk, 21, temperature)
        u = torch.rand(rounds, 2, 21, generator=g).numpy()
        tokens = np.empty(21, dtype=np.int64)
        args = (w.data_ptr(), h.data_ptr(), e.ctypes.data, u.ctypes.data)
        args += (21, 400, 64, 64, rounds, temperature)  # rows, vocab, hidden, block
        draws = lib.sdft_int8_draw(probs.data_ptr(), mass.data_ptr(), *args, 1e-9, tokens.ctypes.data)
        want, want_draws = _draw_reference(
            probs.numpy(), mass.numpy(), w.numpy(), h.numpy(), e, u, 64, temperature
        )
        assert np.array_equal(tokens, want) and draws == want_draws
        assert (tokens >= 0).any() and draws == (21 if rounds == 1 else want_draws)
        if rounds == 1:
            assert (tokens < 0).any()  # rejected, no token
        else:
            assert draws > 21 and (tokens >= 0).all()
        empty = mass.clone()
        empty[3] = 0.0
        assert lib.sdft_int8_draw(probs.data_ptr(), empty.data_ptr(), *args, 1e-9, tokens.ctypes.data) == -1
    with pytest.raises(ValueError, match="temperature 0.0 must be > 0"):
        proposal.sample(h, 0.0, lambda x: x @ w.t())


def test_int8_kernel_exp_is_within_its_declared_error():
    """The kernel's exp against float64 exp, every fp32 input of the ranges each build checks:
    the proposal's bound counts on EXP_MAX_REL_ERROR (`pytest -m slow` checks the whole range)."""
    from sdft_lite import kernels

    lib = _kernel_library()
    worst = [lib.sdft_exp_max_error(lo, hi) for lo, hi in kernels.EXP_CHECK_RANGES]
    assert 0 < max(worst) <= kernels.EXP_MAX_REL_ERROR, worst


@pytest.mark.slow
def test_int8_kernel_exp_is_within_its_declared_error_everywhere():
    """Every fp32 input from -87.3 to 88.7 (2 x 10^9 of them, ~25 s)."""
    from sdft_lite import kernels

    worst = _kernel_library().sdft_exp_max_error(-87.3, 88.7)
    assert 0 < worst <= kernels.EXP_MAX_REL_ERROR, worst


def test_kernel_builds_into_its_cache_and_is_off_without_a_compiler(monkeypatch, tmp_path):
    """A fresh cache gets one library (no temporary left); CC naming no compiler, or
    SDFT_LITE_KERNELS=0, gives None (the PyTorch path) instead of an error."""
    from sdft_lite import kernels

    _kernel_library()
    for env, built in [({"SDFT_LITE_CACHE": str(tmp_path)}, True), ({"CC": "no-such-cc"}, False)]:
        monkeypatch.setattr(kernels, "_LIBRARY", [])
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            lib = kernels.library()
        assert (lib is not None) == built
    assert [p.suffix for p in (tmp_path / "kernels").iterdir()] == [".so"]
    monkeypatch.setattr(kernels, "_LIBRARY", [])
    monkeypatch.setenv("SDFT_LITE_KERNELS", "0")
    assert kernels.library() is None


@pytest.mark.parametrize("kernel", [True, False])  # the C kernel, and PyTorch's int8 product
@pytest.mark.parametrize("rounds", [8, 1])  # 1: many rows fall back to the fp32 head
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_int8_proposal_samples_the_exact_distribution(kernel, rounds, temperature, monkeypatch):
    """Rejection from the int8 approximation draws tokens with the exact softmax(h W^T / T)
    frequencies (chi-square per hidden state), rejections and fallbacks included."""
    import sdft_lite.sampling as sampling

    if kernel:
        _kernel_library()
    monkeypatch.setattr(sampling, "INT8_C_KERNEL", kernel)
    monkeypatch.setattr(sampling, "INT8_ROUNDS", rounds)
    monkeypatch.setattr(sampling, "SAMPLE_BLOCK", 64)  # 7 blocks, the last one partial (400 = 6 * 64 + 16)
    monkeypatch.setattr(sampling, "PROPOSAL_STATS", type(sampling.PROPOSAL_STATS)())
    vocab, hidden, copies, calls = 400, 64, 2500, 8
    w = _head(vocab, hidden, seed=3, outlier=True)
    proposal = sampling.Int8Proposal(w)
    assert (proposal.kernel is not None) == kernel
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, hidden, generator=g) * 15.0  # peaked rows, and a bound of ~0.2-0.4 nats
    h[:, 0] = 11.0
    e = proposal.kernel_inputs(h, temperature)[3] if kernel else proposal.bound(h)[1] / temperature
    assert 0.1 < e.min() < sampling.INT8_MAX_BOUND
    exact = torch.softmax((h.double() @ w.double().t()) / temperature, -1)
    torch.manual_seed(0)
    rows = h.repeat_interleave(copies, 0)
    drawn = torch.cat([proposal.sample(rows, temperature, lambda x: x @ w.t()) for _ in range(calls)])
    drawn = drawn.view(calls, 2, copies).transpose(0, 1).reshape(2, -1)
    stats_ = sampling.PROPOSAL_STATS
    assert stats_["rows"] == 2 * copies * calls
    assert stats_["kernel_rows"] == (stats_["rows"] if kernel else 0)
    assert stats_["draws"] + stats_["fallback_rows"] > stats_["rows"] * 1.05  # rejections happened
    if rounds == 1:
        assert stats_["fallback_rows"] > 0
    else:  # acceptance is >= exp(-2 E / T): eight rejections in a row are rare
        assert stats_["fallback_rows"] < 0.01 * stats_["rows"]
    for row in range(2):
        counts = torch.bincount(drawn[row], minlength=vocab).double()
        expected = exact[row] * drawn.shape[1]
        big = expected >= 5  # bins with expected count >= 5, the rest merged into one
        observed = torch.cat([counts[big], counts[~big].sum()[None]])
        expect = torch.cat([expected[big], expected[~big].sum()[None]])
        assert stats.chisquare(observed, expect).pvalue > 1e-3


def _big_head_model(monkeypatch, folder):
    """A 1-layer Llama with a 10 MiB head (above LARGE_HEAD_MIN_BYTES; conftest's builder, saved
    in `folder`), sampled through the int8 proposal on every CPU: `int8_proposal_enabled` answers
    as on an AVX2 CPU (the proposal is exact on every path; the rule is tested on its own)."""
    import sdft_lite.sampling as sampling

    model = build_model(folder, vocab_size=20_480, hidden=128, layers=1).eval()
    assert model.lm_head.weight.nbytes >= sampling.LARGE_HEAD_MIN_BYTES
    rule = sampling.int8_proposal_enabled
    monkeypatch.setattr(
        sampling, "int8_proposal_enabled", lambda shape, simd, cpu: rule(shape, "AVX2", "AVX2")
    )
    return model


def test_int8_proposal_is_given_up_when_its_bound_is_too_large(monkeypatch, tmp_path):
    """Hidden states so large that every token falls back to the fp32 head: the copy is used for
    one rollout (same tokens as the fp32 head would give: all from it), then dropped."""
    import sdft_lite.sampling as sampling

    model = _big_head_model(monkeypatch, tmp_path)
    with torch.no_grad():
        model.model.norm.weight.fill_(1e4)  # |h| ~ 1e5: the bound is far above INT8_MAX_BOUND
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], 0)
    kwargs = dict(max_new_tokens=4, eos_ids=[-1], pad_id=0, logprobs=False)
    monkeypatch.setattr(sampling, "PROPOSAL_STATS", type(sampling.PROPOSAL_STATS)())
    sample_completions(model, ids, mask, **kwargs)
    assert sampling.PROPOSAL_STATS["rows"] == sampling.PROPOSAL_STATS["fallback_rows"] == 2 * 4
    assert sampling._INT8_HEADS[0][2] is not None
    sample_completions(model, ids, mask, **kwargs)
    assert sampling._INT8_HEADS[0][2] is None  # given up for this head
    assert sampling.PROPOSAL_STATS["rows"] == 8  # the second rollout used the fp32 head only


def test_rollouts_draw_through_the_int8_proposal_only_without_logprobs_top_k_top_p(monkeypatch, tmp_path):
    """sample_completions uses the int8 proposal for plain temperature sampling without log-probs,
    on a head above LARGE_HEAD_MIN_BYTES; with log-probs, top-k, top-p or greedy it keeps the
    fp32 head, which the proposal path calls only for rows that fall back: none here on any CPU
    (the final RMSNorm makes |h| = sqrt(128), so the bound E is ~0.03-0.05 nats on every vector
    path, far below INT8_MAX_BOUND, and eight rejections in a row have odds below 1e-8). The
    fp32 head was once called nine times more where a timed speed check probed it."""
    import sdft_lite.sampling as sampling

    model = _big_head_model(monkeypatch, tmp_path)
    cfg = model.config
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], 0)
    kwargs = dict(max_new_tokens=6, eos_ids=[-1], pad_id=0, num_samples=2)
    head_calls = []
    call = sampling.DecodeHead.__call__
    monkeypatch.setattr(
        sampling.DecodeHead, "__call__", lambda self, h: head_calls.append(1) or call(self, h)
    )
    for extra, used in [
        (dict(logprobs=False), True),
        (dict(logprobs=False, temperature=0.8), True),
        (dict(), False),
        (dict(logprobs=False, top_k=50), False),
        (dict(logprobs=False, top_p=0.9), False),
        (dict(logprobs=False, greedy=True), False),
    ]:
        monkeypatch.setattr(sampling, "PROPOSAL_STATS", type(sampling.PROPOSAL_STATS)())
        torch.manual_seed(0)
        tokens, logp = sample_completions(model, ids, mask, **kwargs, **extra)
        assert tokens.shape == (4, 6) and int(tokens.max()) < cfg.vocab_size
        assert (logp is None) == (extra.get("logprobs", True) is False)
        # every token, the first (from the prefill's hidden state) too, goes through the
        # proposal, and the fp32 head is called only for rows that fall back
        assert sampling.PROPOSAL_STATS["rows"] == (4 * 6 if used else 0), extra
        if used:
            assert sampling.PROPOSAL_STATS["fallback_rows"] == 0 and len(head_calls) == 0
        else:
            assert len(head_calls) == 6  # one fp32 head call per token
        head_calls.clear()
    head = model.lm_head.weight
    assert sampling._INT8_HEADS[0][0]() is head  # the copy is kept for the next rollout ...
    with torch.no_grad():
        head.mul_(1.0)  # ... until the weight changes
    first = sampling._INT8_HEADS[0][2]
    sample_completions(model, ids, mask, **kwargs, logprobs=False)
    assert sampling._INT8_HEADS[0][2] is not first
    del model, head, first
    import gc

    gc.collect()
    assert not sampling._INT8_HEADS  # freed with the model's head


@pytest.mark.parametrize("layout", ["transposed", "vocab_major", "linear"])
def test_same_seed_samples_the_same_tokens_and_no_timing_is_taken(layout, monkeypatch, tmp_path):
    """One model and seed sampled twice, with other rollouts between them, gives the same tokens
    through the int8 proposal (which never calls the fp32 head here: once) and through the fp32
    head, whichever layout this CPU's rule picks (each forced here), with log-probs, top-k and
    top-p; and no clock is read while sampling: a fast path chosen from a timing gave other
    tokens on a loaded machine."""
    import time

    import sdft_lite.sampling as sampling

    model = _big_head_model(monkeypatch, tmp_path)
    monkeypatch.setattr(sampling, "head_layout", lambda weight: layout)
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], 0)
    plain = [dict(logprobs=False), dict(logprobs=False, temperature=0.7)]  # the int8 proposal
    settings = (plain if layout == "transposed" else []) + [dict(), dict(top_k=40, top_p=0.8)]

    def clock():
        raise AssertionError("a clock was read while sampling")

    def run(seed: int, **extra):
        torch.manual_seed(seed)
        with monkeypatch.context() as m:
            for name in ("perf_counter", "perf_counter_ns", "monotonic", "time", "process_time"):
                m.setattr(time, name, clock)
            return sample_completions(
                model, ids, mask, max_new_tokens=6, eos_ids=[-1], pad_id=0, num_samples=2, **extra
            )

    monkeypatch.setattr(sampling, "PROPOSAL_STATS", type(sampling.PROPOSAL_STATS)())
    first = [run(3, **extra) for extra in settings]
    assert sampling.PROPOSAL_STATS["rows"] == (2 * 4 * 6 if layout == "transposed" else 0)
    run(4, **settings[0])  # another rollout in between (the int8 copy and the buffers are reused)
    again = [run(3, **extra) for extra in settings]
    for (ids_a, lp_a), (ids_b, lp_b) in zip(first, again, strict=True):
        assert torch.equal(ids_a, ids_b)
        assert (lp_a is None and lp_b is None) or torch.equal(lp_a, lp_b)
    assert len({tuple(r) for run_ in first for r in run_[0].tolist()}) > 4  # not a constant output
    assert not torch.equal(run(4, **settings[0])[0], first[0][0])  # the seed matters

"""The built-in sampler draws from the same distribution as the reference (torch.multinomial /
transformers' generate), and its greedy path and log-probs match an unpadded forward."""

from __future__ import annotations

import contextlib

import pytest
import torch
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


@pytest.mark.parametrize("block", [2048, 7])  # one block; 9 blocks, the last one partial (60 = 8 * 7 + 4)
@pytest.mark.parametrize(
    "warp", [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)]
)
def test_sampler_matches_reference_frequencies(warp, block):
    torch.manual_seed(0)
    logits = warp_logits(_logits(), **warp)
    probs = torch.softmax(logits, -1)[0].double()
    ours = _counts(sample_from_logits(logits.expand(DRAWS, V), block=block)[0])
    ref = _counts(torch.multinomial(probs.float(), DRAWS, replacement=True))
    support = probs > 0
    assert ours[~support].sum() == 0, "sampled a token outside the warped support"
    # Goodness of fit to the exact distribution (bins with expected count >= 5 kept whole).
    expected = probs[support] * DRAWS
    p_fit = stats.chisquare(ours[support], expected).pvalue
    # Same distribution as torch.multinomial: a two-sample chi-square test on the contingency table.
    table = torch.stack([ours[support], ref[support]]).numpy()
    p_same = stats.chi2_contingency(table[:, table.sum(0) > 0]).pvalue
    assert p_fit > 1e-3 and p_same > 1e-3, (p_fit, p_same)


@pytest.mark.parametrize("block", [2048, 7])
def test_sampler_logprobs_are_the_warped_logprobs(block):
    logits = warp_logits(_logits(1), temperature=1.0, top_k=10, top_p=1.0).expand(64, V)
    tokens, logp = sample_from_logits(logits, block=block)
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


def test_decode_head_gives_the_model_logits(model_and_tok, monkeypatch):
    """The decode loop's head (the weight transposed once per rollout on CPU) gives the model's
    own logits; above the copy cap the head module is called as it is, with the same result."""
    import sdft_lite.sampling as sampling
    from sdft_lite.models import output_head

    model, _ = model_and_tok
    assert output_head(model).linear_weight is not None  # a plain fp32 head: the copy is made
    hidden = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        ref = model.get_output_embeddings()(hidden).float()
        torch.testing.assert_close(sampling.decode_head(model)(hidden), ref, atol=1e-5, rtol=1e-5)
        monkeypatch.setattr(sampling, "DECODE_HEAD_COPY_MAX_BYTES", 0)
        torch.testing.assert_close(sampling.decode_head(model)(hidden), ref, atol=1e-5, rtol=1e-5)


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

"""Rollouts and greedy evaluation through transformers' `generate` sample what the recipe says,
whatever the model folder's generation_config.json holds, and record the log-probs of the
distribution actually sampled (after temperature, top-k and top-p), as the built-in sampler does."""

from __future__ import annotations

import shutil

import pytest
import torch

from sdft_lite.config import GenerationConfig
from sdft_lite.prompts import left_pad
from sdft_lite.rollout import generate_rollouts
from sdft_lite.sampling import warp_logits

# What a checkpoint may ship (Qwen2.5's instruct models: repetition_penalty 1.05-1.1, top_k 20,
# top_p 0.8, temperature 0.7), pushed to values that change every completion, and processors
# that have no neutral value a caller could pass to undo them (suppress_tokens).
LEAKY = dict(
    do_sample=True,
    repetition_penalty=5.0,
    no_repeat_ngram_size=2,
    top_k=2,
    top_p=0.5,
    temperature=0.3,
    suppress_tokens=[30, 31, 32],
)


def _sharpened(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():  # sharper random weights: peaked distributions, greedy paths that differ
        for p in model.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    return model


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    """(the tiny model, the same weights from a folder whose generation_config.json is LEAKY, tokenizer)."""
    from transformers import AutoTokenizer
    from transformers import GenerationConfig as HFGenerationConfig

    leaky_dir = tmp_path_factory.mktemp("leaky-model")
    shutil.copytree(tiny_model_dir, leaky_dir, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    HFGenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id, **LEAKY).save_pretrained(leaky_dir)
    clean, leaky = _sharpened(tiny_model_dir), _sharpened(leaky_dir)
    assert (
        leaky.generation_config.repetition_penalty == 5.0
        and clean.generation_config.repetition_penalty is None
    )
    return clean, leaky, tok


def _prompts(tok):
    ids, mask = left_pad(
        [tok("abc de")["input_ids"], tok("x")["input_ids"], tok("hello")["input_ids"]], tok.pad_token_id
    )
    return ids, mask, [tok.convert_tokens_to_ids("<|im_end|>")]


def _rollout(model, tok, cfg, seed=0, eos=None, **kw):
    ids, mask, eos_ids = _prompts(tok)
    torch.manual_seed(seed)
    return generate_rollouts(model, ids, mask, cfg, eos or eos_ids, tok.pad_token_id, **kw)


def test_saved_generation_config_changes_plain_generate(models):
    """The fixture's saved config is strong enough to show: the raw `generate` of the two folders
    (same weights, same seed) differs, sampled and greedy. The tests below rely on it."""
    clean, leaky, tok = models
    ids, mask, eos = _prompts(tok)

    def raw(model, **kw):
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, **kw)
        return out[:, ids.shape[1] :]

    assert not torch.equal(raw(clean, do_sample=True), raw(leaky, do_sample=True))
    assert not torch.equal(raw(clean, do_sample=False), raw(leaky, do_sample=False))


@pytest.mark.parametrize("engine,num_samples", [("generate", 1), ("generate", 2), ("sdft", 2)])
def test_samples_ignore_the_saved_generation_config(models, engine, num_samples):
    clean, leaky, tok = models
    cfg = GenerationConfig(max_new_tokens=12, engine=engine)  # temperature 1, no top-k / top-p
    kw = dict(num_samples=num_samples, record_logprobs=True)
    want, got = _rollout(clean, tok, cfg, **kw), _rollout(leaky, tok, cfg, **kw)
    assert torch.equal(got.completion_ids, want.completion_ids)
    torch.testing.assert_close(got.logprobs, want.logprobs)
    assert leaky.generation_config.repetition_penalty == 5.0  # the model's own config is back


def test_generate_engine_greedy_ignores_the_saved_generation_config(models):
    """Greedy evaluation (and the Unsloth backend's, which always goes through generate)."""
    from peft import LoraConfig, get_peft_model

    clean, leaky, tok = models
    cfg = GenerationConfig(max_new_tokens=12, engine="generate")
    want = _rollout(clean, tok, cfg, greedy=True)
    assert torch.equal(_rollout(leaky, tok, cfg, greedy=True).completion_ids, want.completion_ids)
    # Evaluation runs on a PeftModel: its generate reads the config through the wrapped model.
    peft = get_peft_model(leaky, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    try:
        assert torch.equal(_rollout(peft, tok, cfg, greedy=True).completion_ids, want.completion_ids)
        assert peft.generation_config.repetition_penalty == 5.0
    finally:
        peft.unload()  # the module-scoped model without its LoRA layers again


def _reference_logprobs(model, tok, roll, temperature, top_k, top_p, num_samples):
    """Log-prob of each sampled token under the warped distribution, from one unpadded forward
    per row and the built-in sampler's warping (`warp_logits`, tested against transformers')."""
    ids, mask, _ = _prompts(tok)
    rows = []
    with torch.no_grad():
        for r in range(roll.completion_ids.shape[0]):
            prompt = ids[r // num_samples][mask[r // num_samples].bool()]
            n = int(roll.lengths[r])
            completion = roll.completion_ids[r, :n]
            logits = model(torch.cat([prompt, completion])[None]).logits[0, len(prompt) - 1 : -1].float()
            logp = torch.log_softmax(warp_logits(logits, temperature, top_k, top_p), -1)
            ref = torch.zeros(roll.completion_ids.shape[1])
            ref[:n] = logp.gather(-1, completion[:, None]).squeeze(-1)
            rows.append(ref)
    return torch.stack(rows)


def test_both_engines_record_the_logprobs_of_the_warped_distribution(models):
    """loss.is_clip divides by the rollout's log-probs: both engines must record log p of the
    distribution they sampled from, after temperature, top-k and top-p."""
    clean, _, tok = models
    t, k, p, g = 0.7, 5, 0.9, 2
    warped_any = False
    for engine in ("generate", "sdft"):
        cfg = GenerationConfig(max_new_tokens=10, temperature=t, top_k=k, top_p=p, engine=engine)
        roll = _rollout(clean, tok, cfg, seed=3, eos=[-1], record_logprobs=True, num_samples=g)
        assert (roll.lengths == 10).all()  # no EOS: every row is a full 10 tokens
        want = _reference_logprobs(clean, tok, roll, t, k, p, g)
        torch.testing.assert_close(roll.logprobs, want, atol=1e-4, rtol=1e-4)
        assert torch.isfinite(roll.logprobs).all()
        # The reference is not the unwarped distribution's (what generate's processors saw before).
        unwarped = _reference_logprobs(clean, tok, roll, 1.0, 0, 1.0, g)
        warped_any |= bool((unwarped - want).abs().max() > 0.05)
    assert warped_any

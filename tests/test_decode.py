"""The lean decode step (sdft_lite/decode.py) gives the generic forward's hidden states for every
architecture it accepts, with left padding, grouped-query attention, LoRA and 4-bit layers, and
the rollout samples the same tokens with it; models it does not accept keep the generic step."""

from __future__ import annotations

import platform

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

import sdft_lite.sampling as sampling
from sdft_lite.decode import LeanDecoder
from sdft_lite.models import position_ids_from_mask

SHAPE = dict(
    vocab_size=50,
    hidden_size=64,
    intermediate_size=128,  # bitsandbytes CPU 4-bit: in_features a multiple of 64
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: two query heads per key/value head
    max_position_embeddings=128,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SHAPE, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2": lambda: Qwen2Config(**SHAPE),  # biases on q, k, v
    "qwen3": lambda: Qwen3Config(**SHAPE, head_dim=32),  # q/k norms; head_dim != hidden / heads
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=64),  # a window the rollout never reaches
}


def _model(arch: str, lora: bool = True, attn: str = "sdpa", **load):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = CONFIGS[arch]()
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config)
    if load:  # 4-bit: through a saved folder, as users load it
        import tempfile

        folder = tempfile.mkdtemp()
        model.save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, **load)
    with torch.no_grad():  # larger weights: peaked, position-sensitive outputs
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and p.dtype == torch.float32:
                p.mul_(3.0)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
    return model.eval()


def _prompts():
    ids = torch.tensor([[0, 0, 0, 5, 9, 11], [7, 3, 8, 2, 4, 6], [0, 0, 0, 0, 13, 1]])
    return ids, (ids != 0).long()


def _generic_and_lean(
    model, steps: int = 6, samples: int = 2, fused: bool | None = None, c_step: bool | None = None
):
    """Hidden states of the same decode steps: the generic forward vs `LeanDecoder.step`
    (`fused`, `c_step`: whether the lean decoder must, or must not, take the fused step, and that
    step through the C kernel)."""
    from sdft_lite.models import causal_lm

    decoder = causal_lm(model).get_decoder()
    ids, mask = _prompts()
    caches = []
    for _ in range(2):
        cache = DynamicCache()
        decoder(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            past_key_values=cache,
        )
        cache.batch_repeat_interleave(samples)
        caches.append(cache)
    mask = mask.repeat_interleave(samples, 0)
    next_pos = mask.sum(-1, keepdim=True)
    assert LeanDecoder.supports(decoder, mask.shape[1] + steps)
    path = LeanDecoder.path(decoder, mask.shape[1] + steps, mask.device)  # before any copy is made
    lean = LeanDecoder(decoder, caches[1], mask, next_pos, steps)
    assert path == ("c_step" if lean.c_step else "fused" if lean.fused else "modules")  # it mirrors them
    if fused is not None:
        assert (lean.fused is not None) == fused
    if c_step is not None:
        assert (lean.c_step is not None) == c_step
    tokens = torch.randint(1, 50, (steps, mask.shape[0]), generator=torch.Generator().manual_seed(1))
    generic, ours = [], []
    for step in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = decoder(
            input_ids=tokens[step][:, None],
            attention_mask=mask,
            position_ids=next_pos + step,
            past_key_values=caches[0],
        )
        generic.append(out.last_hidden_state[:, -1])
        ours.append(lean.step(tokens[step]))
    return torch.stack(generic), torch.stack(ours)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_lean_step_gives_the_generic_hidden_states(arch):
    with torch.no_grad():
        generic, ours = _generic_and_lean(_model(arch))
    assert generic.abs().mean() > 0.1  # a non-trivial signal
    torch.testing.assert_close(ours, generic, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("c_step", [True, False])
def test_fused_step_with_merged_lora_gives_the_generic_hidden_states(arch, c_step, monkeypatch):
    """Under `merged_lora` every linear is a plain fp32 weight: the fused step runs (through the
    C kernel where it applies: every family here but Qwen3, whose q/k norms it does not take),
    and matches the generic forward of the unmerged adapter."""
    import sdft_lite.decode as decode
    from sdft_lite import kernels

    if c_step and kernels.library() is None:  # CI has gcc: there the C step is tested, never skipped
        pytest.skip("no C compiler here")
    monkeypatch.setattr(decode, "C_STEP", c_step)
    model = _model(arch)
    with torch.no_grad():
        generic, _ = _generic_and_lean(model, fused=False, c_step=False)  # LoRA not merged: the module step
        with sampling.merged_lora(model):
            _, ours = _generic_and_lean(model, fused=True, c_step=c_step and arch != "qwen3")
    assert generic.abs().mean() > 0.1
    torch.testing.assert_close(ours, generic, atol=1e-5, rtol=1e-5)
    assert not any(hasattr(m, "sdft_merged") for m in model.modules())  # merged_lora cleaned up


def test_fused_step_stays_within_its_byte_cap(monkeypatch):
    """Copies over `FUSED_MAX_BYTES` for the whole decoder: the module step, with no layer's
    copy made past the cap; the cap checks what the copies really take."""
    import sdft_lite.decode as decode
    from sdft_lite.decode import FusedLayer

    model = _model("qwen2", lora=False)
    layer = model.model.layers[0]
    fused = FusedLayer.build(layer, 2**40)
    attn, mlp = layer.self_attn, layer.mlp
    weights = [m.weight for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)]
    assert fused.nbytes() == FusedLayer.copy_bytes(*weights)
    assert FusedLayer.build(layer, fused.nbytes() - 1) is None
    monkeypatch.setattr(decode, "FUSED_MAX_BYTES", 2 * fused.nbytes() - 1)  # one layer fits, not two
    with torch.no_grad():
        generic, ours = _generic_and_lean(model, fused=False)
    torch.testing.assert_close(ours, generic, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="builds the x86-64 vector paths (-mno-avx512f, -march=x86-64): x86-64 CPUs only",
)
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-march=x86-64",)])  # the AVX2 and scalar C paths
def test_c_step_on_other_vector_paths(flags, monkeypatch, tmp_path):
    """The C step built for the other vector paths (AVX2; scalar C) matches the generic forward too."""
    import ctypes

    from sdft_lite import kernels

    if kernels.library() is None:
        pytest.skip("no C compiler here")
    built = kernels._build(kernels._compiler()[0], tmp_path / "variant.so", extra_flags=flags)
    assert built is not None
    monkeypatch.setattr(kernels, "_LIBRARY", [kernels._bind(ctypes.CDLL(str(built)))])
    with torch.no_grad():
        generic, ours = _generic_and_lean(_model("qwen2", lora=False), fused=True, c_step=True)
    torch.testing.assert_close(ours, generic, atol=1e-5, rtol=1e-5)


def test_c_step_takes_silu_models_only_and_refuses_bad_token_ids():
    """An MLP activation other than SiLU keeps the PyTorch fused step (same hidden states as the
    generic forward); a token id outside the embedding stops the C step with a message instead of
    reading past the table."""
    from sdft_lite import kernels

    if kernels.library() is None:
        pytest.skip("no C compiler here")
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, hidden_act="gelu")
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        generic, ours = _generic_and_lean(model, fused=True, c_step=False)
    torch.testing.assert_close(ours, generic, atol=1e-5, rtol=1e-5)
    decoder = _model("llama", lora=False).model
    ids, mask = _prompts()
    cache = DynamicCache()
    with torch.no_grad():
        decoder(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            past_key_values=cache,
        )
        lean = LeanDecoder(decoder, cache, mask, mask.sum(-1, keepdim=True), 4)
        assert lean.c_step is not None
        with pytest.raises(ValueError, match="sdft_decode_step"):
            lean.step(torch.tensor([1, 2, SHAPE["vocab_size"]]))


def test_rotated_rows_give_rotate_half():
    from transformers.models.llama.modeling_llama import rotate_half

    from sdft_lite.decode import _rotated_rows

    w, x = torch.randn(3 * 8, 5), torch.randn(2, 5)  # 3 heads of 8
    ours = (x @ _rotated_rows(w, 8).t()).view(2, 3, 8)
    assert torch.equal(ours, rotate_half((x @ w.t()).view(2, 3, 8)))


def test_lean_step_with_eager_attention_and_without_an_adapter():
    with torch.no_grad():  # plain nn.Linear layers: the fused step
        generic, ours = _generic_and_lean(_model("qwen2", lora=False, attn="eager"), fused=True)
    torch.testing.assert_close(ours, generic, atol=1e-5, rtol=1e-5)


def test_lean_step_on_a_4bit_model_with_lora():
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = _model("llama", quantization_config=quant)
    assert any("4bit" in type(m).__name__ for m in model.modules())
    paths = sampling.rollout_paths(model, 6, 12)
    assert not paths["merged_lora"] and paths["lean_decode"] == "modules"
    with torch.no_grad(), sampling.merged_lora(model):  # not merged (quantized base): the module step
        generic, ours = _generic_and_lean(model, fused=False)
    torch.testing.assert_close(ours, generic, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_rollouts_sample_the_same_with_the_lean_step(arch, monkeypatch):
    model = _model(arch)
    ids, mask = _prompts()
    runs = {}
    for lean in (True, False):
        monkeypatch.setattr(sampling, "LEAN_DECODE", lean)
        torch.manual_seed(5)
        with sampling.merged_lora(model):
            runs[lean] = sampling.sample_completions(
                model, ids, mask, max_new_tokens=10, eos_ids=[-1], pad_id=0, num_samples=2
            )
    (lean_ids, lean_lp), (ref_ids, ref_lp) = runs[True], runs[False]
    assert sampling.rollout_paths(model, 6, ids.shape[1] + 10)["lean_decode"] == "generic"  # LEAN_DECODE off
    monkeypatch.setattr(sampling, "LEAN_DECODE", True)
    paths = sampling.rollout_paths(model, 6, ids.shape[1] + 10)  # what the lean run took
    from sdft_lite import kernels

    c_step = arch == "llama" and kernels.library() is not None  # qwen3's q/k norms: the PyTorch step
    assert paths["merged_lora"] and paths["lean_decode"] == ("c_step" if c_step else "fused")
    assert len({tuple(r) for r in ref_ids.tolist()}) > 2  # the rows really differ
    assert torch.equal(lean_ids, ref_ids)
    torch.testing.assert_close(lean_lp, ref_lp, atol=1e-5, rtol=1e-5)


def test_unsupported_models_keep_the_generic_step():
    from sdft_lite.models import causal_lm

    mistral = causal_lm(_model("mistral", lora=False)).get_decoder()
    assert LeanDecoder.supports(mistral, 64)
    assert not LeanDecoder.supports(mistral, 65)  # the sliding window would cut the prompt
    qwen2 = Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    decoder = AutoModelForCausalLM.from_config(qwen2).get_decoder()
    assert LeanDecoder.supports(decoder, 16) and not LeanDecoder.supports(decoder, 17)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    assert not LeanDecoder.supports(gpt2.get_decoder(), 8)
    assert LeanDecoder.path(mistral, 65, torch.device("cpu")) == "generic"
    assert sampling.rollout_paths(gpt2, 2, 8)["lean_decode"] == "generic"

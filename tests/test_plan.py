"""The memory plan: what each setting does to it, that its parameter counts are the real ones,
fits / suggestions, reading config.json, and one estimate against a measured CPU peak."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sdft_lite.config import load_recipe
from sdft_lite.plan import (
    PROJECTIONS,
    Arch,
    GiB,
    PlanError,
    check_fits_visible_gpu,
    estimate,
    format_plan,
    load_model_config,
    plan_recipe,
)

REPO = Path(__file__).resolve().parents[1]
# config.json values of public models (sizes only).
QWEN_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}
LLAMA_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
LLAMA_70B = {
    **LLAMA_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}


@pytest.fixture
def make_recipe(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "p", "demonstration": "d"}\n')

    def make(**sections):
        raw = {"model": {"name": "some/model"}, "data": {"source": str(data)}}
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return load_recipe(None, data=raw)

    return make


def comp(plan, name: str) -> int:
    return next(c.bytes for c in plan.components if c.name.startswith(name))


def test_components_scale_as_expected(make_recipe):
    default = estimate(make_recipe(), QWEN_05B)
    fp16 = estimate(make_recipe(model={"load_in_4bit": False}), QWEN_05B)
    assert comp(default, "base weights: decoder") < 0.3 * comp(fp16, "base weights: decoder")
    assert comp(default, "base weights: embeddings") == comp(
        fp16, "base weights: embeddings"
    )  # never quantized

    base_teacher = estimate(make_recipe(teacher={"kind": "base"}), QWEN_05B)
    assert default.phase_bytes("static") > base_teacher.phase_bytes("static")
    assert not any(c.name.startswith("EMA") for c in base_teacher.components)

    no_ckpt = estimate(make_recipe(train={"gradient_checkpointing": False}), QWEN_05B)
    assert comp(no_ckpt, "student activations") > 5 * comp(default, "student activations")

    bigger = {
        "batch": make_recipe(train={"batch_size": 8}),
        "length": make_recipe(generation={"max_new_tokens": 512}),
        "generations": make_recipe(generation={"num_generations": 2}),
    }
    for what, recipe in bigger.items():
        plan = estimate(recipe, QWEN_05B)
        assert comp(plan, "rollout KV cache") > comp(default, "rollout KV cache"), what
        assert comp(plan, "student activations") > comp(default, "student activations"), what
        assert plan.total > default.total, what

    assert comp(estimate(make_recipe(model={"lora": {"r": 64}}), QWEN_05B), "LoRA") == 4 * comp(
        default, "LoRA"
    )
    # Unsloth's checkpointing keeps layer inputs in CPU RAM.
    unsloth = estimate(make_recipe(), QWEN_05B, backend="unsloth")
    assert comp(unsloth, "student activations") < comp(default, "student activations")
    # On a GPU the CUDA context counts; float32 doubles what the 16-bit compute dtype holds.
    cpu = estimate(make_recipe(), QWEN_05B, device="cpu")
    assert cpu.phase_bytes("overhead") == 0 < default.phase_bytes("overhead")
    assert comp(cpu, "base weights: embeddings") == 2 * comp(default, "base weights: embeddings")


def test_total_is_static_plus_the_largest_phase(make_recipe):
    plan = estimate(make_recipe(), LLAMA_8B)
    phases = {p: plan.phase_bytes(p) for p in ("rollout", "teacher", "student")}
    assert plan.total == plan.phase_bytes("static") + max(phases.values()) + plan.phase_bytes("overhead")
    assert sum(c.bytes for c in plan.components) >= plan.total


def test_fits_and_suggestions(make_recipe):
    small = estimate(make_recipe(), QWEN_05B)
    assert all(small.fits(gb) for gb in (8, 12, 16, 24)) and small.suggestions(8) == []

    plan = estimate(make_recipe(train={"batch_size": 8, "gradient_checkpointing": False}), LLAMA_8B)
    assert not plan.fits(8) and not plan.fits(16)
    steps = plan.suggestions(16)
    assert steps and "gradient_checkpointing: true" in steps[0]  # the biggest saving comes first
    assert float(steps[-1].rsplit("-> ", 1)[1].split()[0]) <= 16 * 0.92  # the last step fits

    text = format_plan(plan)
    assert "8 GB GPU: does not fit" in text and "train.gradient_checkpointing: true" in text
    assert "24 GB GPU: fits" in format_plan(estimate(make_recipe(), LLAMA_8B))

    huge = estimate(make_recipe(), LLAMA_70B)
    assert huge.suggestions(8)[-1].startswith("still too large")


def test_arch_counts_match_real_models():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    for cls, cfg in [
        (
            LlamaForCausalLM,
            LlamaConfig(
                vocab_size=300,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=False,
            ),
        ),
        (
            Qwen2ForCausalLM,
            Qwen2Config(
                vocab_size=300,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            ),
        ),
    ]:
        torch.manual_seed(0)
        model = cls(cfg)
        arch = Arch.from_config(cfg)  # a transformers config object works as well as a dict
        assert arch == Arch.from_config(json.loads(cfg.to_json_string()))
        assert arch.total_params == sum(p.numel() for p in model.parameters()), cls.__name__
        for targets in (PROJECTIONS, ("q_proj", "v_proj")):
            peft = get_peft_model(cls(cfg), LoraConfig(r=4, target_modules=list(targets)))
            trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
            assert arch.lora_params(4, targets) == trainable, (cls.__name__, targets)


def test_arch_from_configs():
    nested = {
        "model_type": "gemma3",
        "tie_word_embeddings": True,
        "vision_config": {"hidden_size": 1152},
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "vocab_size": 262208,
        },
    }
    arch = Arch.from_config(nested)
    assert (arch.hidden, arch.head_dim, arch.tied) == (2560, 256, True)
    moe = Arch.from_config(
        {**QWEN_05B, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 512}
    )
    assert (moe.experts, moe.active_experts, moe.intermediate) == (8, 2, 512)
    with pytest.raises(PlanError, match="hidden_size"):
        Arch.from_config({"model_type": "x", "vocab_size": 10})


def test_load_model_config(tiny_model_dir, monkeypatch):
    assert load_model_config(str(tiny_model_dir))["hidden_size"] == 64
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PlanError, match="not cached"):
        load_model_config("nobody/no-such-model-sdft-lite-test")


def test_plan_recipe_for_a_local_model(make_recipe, tiny_model_dir):
    recipe = make_recipe(model={"name": str(tiny_model_dir), "backend": "hf"})
    plan = plan_recipe(recipe)
    assert plan.settings.device == "cuda" and plan.arch.hidden == 64
    assert plan.total < 1 * GiB and "memory plan" in format_plan(plan)
    cpu = plan_recipe(recipe, device="cpu")
    assert cpu.settings.dtype_bytes == 4
    # fp32 on CPU: the rollout's transposed head (and merged LoRA weights when not 4-bit) count.
    head = next(c for c in cpu.components if c.name == "rollout: transposed output head")
    assert head.bytes == cpu.arch.vocab * cpu.arch.hidden * 4 and head.phase == "rollout"
    fp32 = plan_recipe(make_recipe(model={"name": str(tiny_model_dir), "load_in_4bit": False}), device="cpu")
    assert any(c.name == "rollout: merged LoRA weights" for c in fp32.components)
    assert not any(c.name.startswith("rollout: ") and "LoRA" in c.name for c in cpu.components)
    assert not any("transposed" in c.name for c in plan.components)  # not on CUDA
    # fp32 forward KL streams the head in vocabulary tiles: at most tiled_loss.TILE_BYTES of loss buffers.
    from sdft_lite.tiled_loss import TILE_BYTES

    loss = next(c for c in cpu.components if c.name == "loss chunks")
    rows = cpu.settings.batch_size * cpu.settings.num_generations * cpu.settings.max_new_tokens
    whole_vocab = 16 * min(rows, 512) * cpu.arch.vocab  # two [2 rows, tile <= vocab] fp32 buffers
    assert (
        loss.bytes == min(TILE_BYTES, recipe.loss.chunk_budget_mb * 2**20, whole_vocab)
        and "tiles" in loss.detail
    )
    assert "tiles" not in next(c for c in plan.components if c.name == "loss chunks").detail  # bf16


def test_no_refusal_without_a_visible_gpu(make_recipe):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU answer")
    assert check_fits_visible_gpu(estimate(make_recipe(), LLAMA_70B)) is None
    assert check_fits_visible_gpu(estimate(make_recipe(), QWEN_05B, device="cpu")) is None


def test_refusal_names_the_gpu_and_the_fix(make_recipe, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(5.5 * GiB), 8 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake RTX 8GB")
    assert check_fits_visible_gpu(estimate(make_recipe(), QWEN_05B)) is None
    message = check_fits_visible_gpu(estimate(make_recipe(train={"batch_size": 8}), LLAMA_8B))
    assert message and "Fake RTX 8GB has 5.5 GiB free of 8.0 GiB" in message
    assert "train.batch_size" in message and "--force" in message


@pytest.mark.slow
def test_estimate_against_measured_cpu_peak(tmp_path):
    """One real run (2 SDFT steps of a hidden-256 model, in a subprocess): the estimate is within a
    generous factor of the measured peak. benchmarks/plan_vs_measured.py prints the full table."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import plan_vs_measured as bench
    finally:
        sys.path.pop(0)
    model = {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 704, "vocab": 16000}
    config = bench.build_model_dir(tmp_path / "model", sizes=model)
    data = bench.write_data(tmp_path / "train.jsonl", prompt_chars=48)
    recipe = bench.recipe_dict(
        {
            "data": {"max_prompt_tokens": 48, "max_teacher_prompt_tokens": 224},
            "generation": {"max_new_tokens": 32},
        },
        tmp_path / "model",
        data,
        tmp_path / "runs",
        steps=2,
    )
    result = bench._run("test", recipe, config)
    ratio = result["measured_peak_mib"] / result["estimate_peak_mib"]
    print(f"estimate {result['estimate_peak_mib']:.0f} MiB, measured {result['measured_peak_mib']:.0f} MiB")
    assert 0.5 < ratio < 2.0, result

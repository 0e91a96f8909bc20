"""Backend selection and its errors, the Unsloth backend's arguments and import discipline, and
`sdft-lite doctor`, on a CPU machine. Where unsloth is installed, the Unsloth module itself is
imported in subprocesses (it patches transformers for the whole process)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdft_lite.backends import (
    INSTALL_UNSLOTH,
    UNSLOTH_LINEAR_MODULES,
    BackendError,
    backend_of,
    choose_backend,
    cuda_available,
    expand_target_modules,
    load_student_for,
    rollout_context,
    select_backend,
    unsloth_installed,
    unsloth_load_kwargs,
    unsloth_peft_kwargs,
)
from sdft_lite.config import ModelConfig
from sdft_lite.errors import is_user_error

PACKAGE = Path(__file__).resolve().parents[1] / "sdft_lite"
REPO = PACKAGE.parent
HAS_UNSLOTH = unsloth_installed()
needs_unsloth = pytest.mark.skipif(
    not HAS_UNSLOTH, reason=f"unsloth is not installed here ({INSTALL_UNSLOTH})"
)


def run_python(
    code: str, cwd: Path, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (Unsloth writes unsloth_compiled_cache/ into its working directory)."""
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("requested", "cuda", "unsloth", "expected"),
    [
        ("hf", True, True, "hf"),
        ("hf", False, False, "hf"),
        ("auto", True, True, "unsloth"),
        ("auto", True, False, "hf"),
        ("auto", False, True, "hf"),
        ("auto", False, False, "hf"),
        ("unsloth", True, True, "unsloth"),
    ],
)
def test_choose_backend(requested, cuda, unsloth, expected):
    backend, reason = choose_backend(requested, cuda, unsloth)
    assert backend == expected and reason


@pytest.mark.parametrize(
    ("cuda", "unsloth", "says", "not_says"),
    [
        (False, True, ["no CUDA GPU", "backend: hf"], [INSTALL_UNSLOTH]),
        (True, False, ["not installed", INSTALL_UNSLOTH, "backend: hf"], ["CUDA GPU"]),
        (False, False, ["no CUDA GPU", "not installed", INSTALL_UNSLOTH, "backend: hf"], []),
    ],
)
def test_unsloth_requested_where_it_cannot_run(cuda, unsloth, says, not_says):
    with pytest.raises(BackendError) as e:
        choose_backend("unsloth", cuda, unsloth)
    message = str(e.value)
    assert all(s in message for s in says), message
    assert not any(s in message for s in not_says), message
    assert is_user_error(e.value)  # the CLI prints it without a traceback


def test_selection_on_this_machine():
    cuda = cuda_available()
    assert select_backend(ModelConfig(name="m", backend="hf")) == "hf"
    assert select_backend(ModelConfig(name="m")) == ("unsloth" if cuda and HAS_UNSLOTH else "hf")
    if not cuda:
        with pytest.raises(BackendError, match="no CUDA GPU.*Use `model.backend: hf`"):
            select_backend(ModelConfig(name="m", backend="unsloth"))


@pytest.mark.skipif(cuda_available(), reason="checks the CPU dispatch")
def test_load_student_for_dispatches_to_hf_on_cpu(tiny_model_dir):
    cfg = ModelConfig(name=str(tiny_model_dir), backend="auto", load_in_4bit=False, lora={"r": 4, "alpha": 8})
    loaded = load_student_for(cfg, gradient_checkpointing=False, seed=0)
    assert type(loaded.model).__name__ == "PeftModelForCausalLM" and backend_of(loaded.model) == "hf"
    assert "unsloth" not in sys.modules
    loaded.model.train()
    with rollout_context(loaded.model):  # a no-op for hf
        pass
    assert loaded.model.training
    with pytest.raises(BackendError, match=r"sdft-lite\[unsloth\]|no CUDA GPU"):
        load_student_for(cfg.model_copy(update={"backend": "unsloth"}), gradient_checkpointing=False, seed=0)


# --------------------------------------------------------------------------- Unsloth arguments


def test_expand_target_modules():
    assert expand_target_modules("all-linear") == list(UNSLOTH_LINEAR_MODULES)
    assert expand_target_modules(["q_proj", "v_proj", "q_proj"]) == ["q_proj", "v_proj"]
    assert expand_target_modules("all-linear", present={"q_proj", "v_proj", "lm_head"}) == [
        "q_proj",
        "v_proj",
    ]
    with pytest.raises(BackendError, match="match no module"):
        expand_target_modules(["query_key_value"], present={"q_proj", "v_proj"})
    # A listed name the model lacks is an error even next to ones it has (all-linear just narrows).
    with pytest.raises(BackendError) as e:
        expand_target_modules(["q_proj", "qkv"], present={"q_proj", "v_proj"})
    assert "model.lora.target_modules: ['qkv']" in str(e.value) and "['q_proj', 'v_proj']" in str(e.value)


def test_unsloth_kwargs():
    cfg = ModelConfig(
        name="unsloth/Qwen2.5-0.5B-Instruct",
        max_seq_length=1024,
        lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
    )
    load = unsloth_load_kwargs(cfg, cfg.name, gradient_checkpointing=True)
    assert load == dict(
        model_name=cfg.name,
        max_seq_length=1024,
        dtype=None,
        load_in_4bit=True,
        revision=None,
        trust_remote_code=False,
        use_gradient_checkpointing="unsloth",
        use_exact_model_name=True,
    )
    assert (
        unsloth_load_kwargs(cfg.model_copy(update={"dtype": "bfloat16"}), "x", False)["dtype"] == "bfloat16"
    )
    assert unsloth_load_kwargs(cfg, "x", gradient_checkpointing=False)["use_gradient_checkpointing"] is False
    peft = unsloth_peft_kwargs(cfg, gradient_checkpointing=True, seed=7)
    assert peft == dict(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=list(UNSLOTH_LINEAR_MODULES),
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=7,
    )


# --------------------------------------------------------------------------- import discipline


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in a file, in source order, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node.lineno, node.module or ""))
    return sorted(out)


def test_only_the_unsloth_module_imports_unsloth_and_it_does_so_first():
    importers = sorted(
        p.name for p in PACKAGE.rglob("*.py") if any(m.split(".")[0] == "unsloth" for _, m in _imports(p))
    )
    assert importers == ["unsloth_backend.py"]
    module_level = [
        n
        for n in ast.parse((PACKAGE / "unsloth_backend.py").read_text()).body
        if isinstance(n, ast.Import | ast.ImportFrom)
    ]
    assert isinstance(module_level[0], ast.Import) and module_level[0].names[0].name == "unsloth"


def test_backend_selection_and_planning_import_neither_unsloth_nor_transformers(tmp_path):
    res = run_python(
        """
        import sys
        import sdft_lite.backends, sdft_lite.plan, sdft_lite.doctor
        from sdft_lite.backends import select_backend
        from sdft_lite.config import ModelConfig
        select_backend(ModelConfig(name="m"))
        print(sorted(m for m in ("unsloth", "transformers", "peft", "trl") if m in sys.modules))
    """,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


# --------------------------------------------------------------------------- doctor


def test_doctor_reports_this_machine():
    from sdft_lite.doctor import format_doctor, run_doctor

    rows = run_doctor()
    checks = {c: (v, s) for c, v, s in rows}
    assert all(len(r) == 3 for r in rows)
    assert checks["python"][1] == "ok"
    for name in (
        "torch",
        "transformers",
        "peft",
        "trl",
        "bitsandbytes",
        "datasets",
        "accelerate",
        "unsloth",
        "gradio",
        "cuda",
        "cpu kernels",
        "backend auto",
    ):
        assert name in checks, name
    from sdft_lite import kernels

    if kernels.simd() is not None:  # CI has gcc: the kernels build there
        assert checks["cpu kernels"][1] == "ok" and checks["cpu kernels"][0].startswith(kernels.simd())
        assert ("AMX bf16 tiles: yes" in checks["cpu kernels"][0]) == kernels.amx_bf16()
    assert checks["bitsandbytes"][1] == "ok"
    value, status = checks["bitsandbytes 4-bit"]
    assert status == "ok" and value.startswith("works on"), (value, status)
    assert checks["backend auto"][0].startswith("unsloth" if cuda_available() and HAS_UNSLOTH else "hf")
    if not cuda_available():
        assert checks["dtype auto"] == ("float32 (CPU)", "ok")
    assert all(s == "ok" or s.startswith(("warn: ", "missing: ")) for _, _, s in rows)
    text = format_doctor(rows)
    assert "bitsandbytes 4-bit" in text and "backend auto" in text
    assert "unsloth" not in sys.modules  # doctor reads metadata; importing unsloth would patch transformers


@pytest.mark.parametrize(
    ("capability", "says"),
    [((7, 5), "float16 (gpu 0: compute 7.5, no native bfloat16"), ((8, 0), "bfloat16 (gpu 0: compute 8.0")],
)
def test_doctor_reports_the_dtype_rule_for_a_gpu(capability, says):
    from sdft_lite.doctor import dtype_row

    check, value, status = dtype_row(capability)
    assert check == "dtype auto" and value.startswith(says) and status == "ok"


def test_doctor_lists_missing_packages_with_their_fix():
    from sdft_lite.doctor import format_doctor

    rows = [
        ("python", "3.11", "ok"),
        ("peft", "not installed", "missing: pip install sdft-lite"),
        ("gradio", "not installed", "warn: optional, for the web app: pip install gradio"),
    ]
    text = format_doctor(rows)
    assert "missing (training will fail until fixed):\n  peft: pip install sdft-lite" in text
    assert "gradio: optional, for the web app: pip install gradio" in text
    assert "everything sdft-lite needs" not in text


# --------------------------------------------------------------------------- with unsloth installed


@needs_unsloth
def test_unsloth_module_api_under_unsloths_cpu_test_switch(tmp_path):
    """Import the module the way a GPU process does (UNSLOTH_ALLOW_CPU=1 takes Unsloth's CUDA code
    path on a CPU) and check that Unsloth's API still accepts what we pass and still has the
    behaviour the backend relies on."""
    res = run_python(
        """
        import inspect, json, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import sdft_lite.unsloth_backend as ub
        from unsloth import FastLanguageModel
        import unsloth.models.llama as llama
        from unsloth.kernels.utils import get_lora_parameters
        import unsloth.save as save
        from sdft_lite.backends import unsloth_load_kwargs, unsloth_peft_kwargs
        from sdft_lite.config import ModelConfig

        cfg = ModelConfig(name="unsloth/Qwen2.5-0.5B-Instruct", dtype="bfloat16")
        load = unsloth_load_kwargs(cfg, cfg.name, True)
        inspect.signature(FastLanguageModel.from_pretrained).bind(**load)
        inspect.signature(FastLanguageModel.get_peft_model).bind(None, **unsloth_peft_kwargs(cfg, True, 0))
        inspect.signature(save.unsloth_save_pretrained_merged).bind(None, "out", None, save_method="merged_16bit")
        inspect.signature(save.unsloth_save_pretrained_gguf).bind(None, "out", None, quantization_method="q4_k_m")
        print(json.dumps({
            "late_import_warning": [str(w.message)[:200] for w in caught if "imported before" in str(w.message)],
            "device_type": __import__("unsloth").DEVICE_TYPE,
            "keeps_mask_flag": "_unsloth_keep_padding_mask" in inspect.getsource(llama.LlamaModel_fast_forward),
            "honours_disable_adapter": "disable_adapters" in inspect.getsource(get_lora_parameters),
            "mode_helpers": all(callable(getattr(FastLanguageModel, n, None)) for n in ("for_inference", "for_training")),
        }))
    """,
        tmp_path,
        env={"UNSLOTH_ALLOW_CPU": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {
        "late_import_warning": [],
        "device_type": "cuda",
        "keeps_mask_flag": True,
        "honours_disable_adapter": True,
        "mode_helpers": True,
    }, got


@needs_unsloth
def test_unsloth_backend_end_to_end_on_unsloths_cpu_fallback(tiny_model_dir, tmp_path):
    """Without the test switch, Unsloth on a CPU host runs its CPU backend (stock transformers +
    PEFT). Not the GPU kernels, but the real FastLanguageModel API: load, LoRA, both teachers'
    adapter switching, hidden states, rollouts in train and eval mode, merged exports of the live
    model and of a saved adapter folder."""
    res = run_python(
        f"""
        import json, os, torch
        import sdft_lite.unsloth_backend as ub
        from sdft_lite.backends import backend_of, rollout_context
        from sdft_lite.config import GenerationConfig, ModelConfig
        from sdft_lite.models import decoder_hidden_states
        from sdft_lite.rollout import generate_rollouts
        from sdft_lite.teacher import Teacher

        cfg = ModelConfig(name={str(tiny_model_dir)!r}, backend="unsloth", load_in_4bit=False, dtype="float32",
                          lora={{"r": 4, "alpha": 8}})
        lm = ub.load_student(cfg, gradient_checkpointing=True, seed=0)
        ids = torch.randint(4, 60, (2, 10)); mask = torch.ones_like(ids); mask[0, :3] = 0
        teacher = Teacher(lm.model, "ema")
        h = decoder_hidden_states(lm.model, ids, mask)
        with torch.no_grad(), lm.model.disable_adapter():
            base = decoder_hidden_states(lm.model, ids, mask)
        lm.model.eval()
        with rollout_context(lm.model):  # as an evaluation before training does
            generate_rollouts(lm.model, ids, mask, GenerationConfig(max_new_tokens=2), lm.eos_ids, lm.pad_id, greedy=True)
        eval_after_eval = lm.model.training
        lm.model.train()
        with rollout_context(lm.model):
            roll = generate_rollouts(lm.model, ids, mask, GenerationConfig(max_new_tokens=5), lm.eos_ids, lm.pad_id)
        training_after_rollout = lm.model.training
        with torch.no_grad():  # "train" the student: the exports must carry its adapter, not the base
            for n, p in lm.model.named_parameters():
                if "lora_B" in n and ".default." in n:
                    p.add_(0.05 * torch.randn_like(p))
            lm.model.eval()
            student_logits = lm.model(input_ids=ids).logits
            with lm.model.disable_adapter():
                base_logits = lm.model(input_ids=ids).logits
        out = ub.save_merged(lm.model, lm.tokenizer, {str(tmp_path / "merged")!r})
        lm.model.save_pretrained({str(tmp_path / "adapter")!r}, selected_adapters=["default"])  # as a run does
        lm.tokenizer.save_pretrained({str(tmp_path / "adapter")!r})
        exported = ub.export_adapter({str(tmp_path / "adapter")!r}, {str(tmp_path / "export")!r}, cfg)
        from transformers import AutoModelForCausalLM

        def distances(folder):  # (to the student, to the base) of a merged model's logits
            with torch.no_grad():
                m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
                logits = m(input_ids=ids).logits
            return [(logits - ref).abs().max().item() for ref in (student_logits, base_logits)]
        print(json.dumps({{
            "model": type(lm.model).__name__, "backend": backend_of(lm.model), "dtype": str(lm.dtype),
            "adapters": sorted(lm.model.peft_config), "active": lm.model.active_adapters,
            "ema_tensors": len(teacher.shadow), "hidden": list(h.shape), "teacher": list(teacher.hidden_states(ids, mask).shape),
            "lora_starts_at_base": torch.allclose(h, base, atol=1e-5), "training_after_rollout": training_after_rollout,
            "training_after_eval_rollout": eval_after_eval,
            "completion": list(roll.completion_ids.shape), "merged": sorted(os.listdir(out)),
            "exported": sorted(os.listdir(exported)),
            "merged_distances": distances(out), "exported_distances": distances(exported),
        }}))
    """,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert (
        got["model"] == "PeftModelForCausalLM"
        and got["backend"] == "unsloth"
        and got["dtype"] == "torch.float32"
    )
    assert got["adapters"] == ["default", "ema"] and got["active"] == ["default"] and got["ema_tensors"] > 0
    assert got["hidden"] == [2, 10, 64] and got["teacher"] == [2, 10, 64] and got["lora_starts_at_base"]
    assert (
        got["training_after_rollout"] and not got["training_after_eval_rollout"] and got["completion"][0] == 2
    )
    for folder in (got["merged"], got["exported"]):
        assert "config.json" in folder and any(f.endswith(".safetensors") for f in folder), folder
    for to_student, to_base in (got["merged_distances"], got["exported_distances"]):
        assert to_student < 0.1 * to_base, got  # the trained adapter is merged in (16-bit rounding aside)

"""Model loading: the dtype rule and the dtype read back from the loaded model, a saved adapter
loaded into a fresh student (what `sdft-lite export` does), and the user errors of loading a
model (`sdft-lite train` as a subprocess: exit 2, `error: ...` naming the key and the fix)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_model, build_tokenizer, tiny_recipe

from sdft_lite.backends import unsloth_load_kwargs
from sdft_lite.config import ModelConfig
from sdft_lite.models import (
    ModelLoadError,
    choose_dtype,
    linear_module_names,
    load_adapter_weights,
    load_student,
    loaded_dtype,
    pick_dtype,
)

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- dtype


@pytest.mark.parametrize(
    ("requested", "device", "capability", "expected"),
    [
        ("auto", "cuda", (7, 5), "float16"),  # T4: is_bf16_supported() says True (emulation)
        ("auto", "cuda", (7, 0), "float16"),  # V100
        ("auto", "cuda", (8, 0), "bfloat16"),  # A100
        ("auto", "cuda", (8, 6), "bfloat16"),  # RTX 30xx
        ("auto", "cuda", (9, 0), "bfloat16"),  # H100
        ("auto", "cuda", None, "float16"),  # capability unknown: the safe choice
        ("auto", "cpu", None, "float32"),
        ("bfloat16", "cuda", (7, 5), "bfloat16"),  # an explicit request is kept (hf runs it emulated)
        ("float16", "cuda", (9, 0), "float16"),
        ("float32", "cuda", (8, 0), "float32"),
        ("bfloat16", "cpu", None, "bfloat16"),
    ],
)
def test_dtype_rule(requested, device, capability, expected):
    assert choose_dtype(requested, device, capability) == expected


def test_pick_dtype_on_cpu():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loaded_dtype_is_read_back_from_the_weights(tiny_model_dir, dtype):
    cfg = ModelConfig(name=str(tiny_model_dir), backend="hf", load_in_4bit=False, dtype=dtype, lora={"r": 4})
    loaded = load_student(cfg, gradient_checkpointing=False, seed=0)
    base = [p for n, p in loaded.model.named_parameters() if "lora_" not in n]
    assert loaded.dtype == getattr(torch, dtype)
    assert {p.dtype for p in base} == {loaded.dtype}


def test_loaded_dtype_follows_the_model_not_the_request(tiny_model_dir):
    """The case of Unsloth on a T4: bfloat16 asked, float16 loaded; the read-back says float16."""
    cfg = ModelConfig(
        name=str(tiny_model_dir), backend="hf", load_in_4bit=False, dtype="bfloat16", lora={"r": 4}
    )
    model = load_student(cfg, gradient_checkpointing=False, seed=0).model
    model.half()
    assert loaded_dtype(model) == torch.float16


# --------------------------------------------------------------------------- export


def test_export_loads_the_base_at_the_runs_revision(tmp_path):
    """`sdft-lite export` builds the ModelConfig from the run's recipe.yaml; the Unsloth load it
    makes is the training load: the base model by name, at the pinned revision (not the adapter
    folder, which Unsloth would merge onto the default branch)."""
    recipe = {
        "model": {
            "name": "Qwen/Qwen2.5-0.5B-Instruct",
            "revision": "7ae557604adf67be50417f59c2c2f167def9a775",
        }
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    model = yaml.safe_load((tmp_path / "recipe.yaml").read_text())["model"]
    cfg = ModelConfig.model_validate({**model, "backend": "unsloth"})  # as cli.cmd_export does
    kwargs = unsloth_load_kwargs(cfg, cfg.name, gradient_checkpointing=False)
    assert kwargs["revision"] == recipe["model"]["revision"]
    assert kwargs["model_name"] == "Qwen/Qwen2.5-0.5B-Instruct"
    source = (REPO / "sdft_lite" / "unsloth_backend.py").read_text()
    export = source[source.index("def export_adapter(") :]
    assert "load_student(cfg" in export and '"revision"' not in export


def test_saved_adapter_loads_into_a_fresh_student(tiny_model_dir, tmp_path):
    cfg = ModelConfig(name=str(tiny_model_dir), backend="hf", load_in_4bit=False, lora={"r": 4, "alpha": 8})
    trained = load_student(cfg, gradient_checkpointing=False, seed=0).model
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p))
    trained.save_pretrained(str(tmp_path / "adapter"), selected_adapters=["default"])
    fresh = load_student(cfg, gradient_checkpointing=False, seed=1).model
    load_adapter_weights(fresh, tmp_path / "adapter")
    want = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    got = dict(fresh.named_parameters())
    assert want and all(torch.equal(got[n], p) for n, p in want.items())

    other_shape = load_student(
        cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"r": 8})}), False, 0
    )
    with pytest.raises(ModelLoadError, match="adapter"):
        load_adapter_weights(other_shape.model, tmp_path / "adapter")


def test_linear_module_names(tiny_model_dir):
    cfg = ModelConfig(name=str(tiny_model_dir), backend="hf", load_in_4bit=False, lora={"r": 4})
    model = load_student(cfg, gradient_checkpointing=False, seed=0).model
    names = linear_module_names(model)
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(names)
    assert "lm_head" not in names


# --------------------------------------------------------------------------- user errors, via the CLI


def _train(tmp_path: Path, model_name: str, **lora) -> subprocess.CompletedProcess:
    rows = [{"prompt": f"reverse {w}", "demonstration": w[::-1]} for w in ("abc", "cat", "dog", "sky")]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = tiny_recipe(Path(model_name), data, tmp_path / "runs")
    recipe["model"]["name"] = model_name
    recipe["model"]["lora"].update(lora)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "sdft_lite.cli", "train", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


def _user_error(res: subprocess.CompletedProcess) -> str:
    """The `error: ...` line of a run that failed as a user error (exit 2, no traceback)."""
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.returncode == 2, res.stderr[-3000:]
    last = [line for line in res.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: "), res.stderr[-3000:]
    return last


def test_hub_model_not_reachable_offline(tmp_path):
    message = _user_error(_train(tmp_path, "sdft-lite-tests/not-a-cached-model"))
    assert "model.name" in message and "sdft-lite-tests/not-a-cached-model" in message
    assert "hf download sdft-lite-tests/not-a-cached-model" in message


def test_model_folder_with_a_broken_config(tmp_path):
    folder = tmp_path / "broken-model"
    tok = build_tokenizer(folder)
    build_model(folder, vocab_size=len(tok))
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ', encoding="utf-8")
    message = _user_error(_train(tmp_path, str(folder)))
    assert "model.name" in message and str(folder / "config.json") in message and "JSON" in message


def test_empty_model_folder(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    message = _user_error(_train(tmp_path, str(folder)))
    assert "model.name" in message and str(folder) in message
    assert "config.json" in message and "save_pretrained" in message


def test_lora_target_modules_the_model_does_not_have(tiny_model_dir, tmp_path):
    res = _train(tmp_path, str(tiny_model_dir), target_modules=["q_proj", "query_key_value"])
    message = _user_error(res)
    assert "model.lora.target_modules" in message and "query_key_value" in message
    assert "'q_proj'" in message.split("linear layers are", 1)[1] and "down_proj" in message


def test_model_source_errors_name_the_key_and_the_fix(tmp_path, monkeypatch):
    """The same errors without a subprocess, for the other callers (`eval`, `check`, the app)."""
    from sdft_lite.models import check_model_source, load_error

    with pytest.raises(
        ModelLoadError, match=r"teacher.model: .*missing-model does not exist\. Fix: set teacher.model"
    ):
        check_model_source("teacher.model", str(tmp_path / "missing-model"))
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match=r"has no config.json \(it holds notes.txt\)"):
        check_model_source("model.name", str(tmp_path / "not-a-model"))
    check_model_source("model.name", "Qwen/Qwen2.5-0.5B-Instruct")  # a Hub id: checked when it loads

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    e = load_error("model.name", "org/model", OSError("We couldn't connect to 'https://huggingface.co'"))
    assert "HF_HUB_OFFLINE is set" in str(e) and "`hf download org/model`" in str(e)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    e = load_error(
        "model.name",
        "org/model",
        OSError("org/model is not a local folder and is not a valid model identifier"),
    )
    assert "not a valid model identifier" in str(e) and "hf auth login" in str(e)


def test_target_modules_checked_without_weights(tiny_model_dir):
    from transformers import AutoConfig

    from sdft_lite.models import check_target_modules_from_config

    config = AutoConfig.from_pretrained(tiny_model_dir)
    cfg = ModelConfig(name=str(tiny_model_dir), lora={"target_modules": ["q_proj", "self_attn.v_proj"]})
    check_target_modules_from_config(config, cfg)  # a dotted suffix matches, as in PEFT
    bad = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"target_modules": ["q_proj", "wqkv"]})})
    with pytest.raises(ModelLoadError, match=r"\['wqkv'\] match no module.*'down_proj'"):
        check_target_modules_from_config(config, bad)

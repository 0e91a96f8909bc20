"""End-to-end training on tiny real models: run folder contract, what training changes, 4-bit
for every teacher kind, resume, stop, and failures that leave a clear status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe, write_jsonl

from sdft_lite.config import load_recipe
from sdft_lite.runs import RunFolder, read_jsonl
from sdft_lite.train import build_trainer

METRIC_KEYS = {
    "step",
    "loss",
    "kl",
    "completion_length",
    "clipped_fraction",
    "tokens_per_s",
    "generated_tokens_per_s",
    "seconds_per_step",
    "peak_memory_mb",
    "lr",
    "grad_norm",
}
SAMPLE_KEYS = {
    "step",
    "prompt",
    "completion",
    "demonstration",
    "student_logprob_mean",
    "teacher_logprob_mean",
    "tokens",
}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdft_lite.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_in_process(recipe_dict: dict, tmp_path: Path):
    recipe = load_recipe(None, data=recipe_dict)
    run = RunFolder(Path(recipe.output.dir) / recipe.output.name)
    run.prepare("error")
    trainer = build_trainer(recipe, run)
    before = snapshot(trainer.model)
    trainer.train()
    return trainer, before, snapshot(trainer.model)


def assert_lora_moved_base_frozen(before, after, adapter="default"):
    lora = [n for n in before if f".{adapter}." in n and "lora_" in n]
    frozen = [n for n in before if "lora_" not in n]
    assert lora and frozen
    assert any(not torch.equal(before[n], after[n]) for n in lora), "no LoRA weight changed"
    changed = [n for n in frozen if not torch.equal(before[n], after[n])]
    assert not changed, f"base weights changed: {changed[:5]}"


def test_run_folder_contract_via_cli(tiny_model_dir, tiny_data, tmp_path):
    recipe = tiny_recipe(tiny_model_dir, tiny_data, tmp_path / "runs")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = cli("train", str(path), "train.max_steps=3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = RunFolder(tmp_path / "runs" / "run")
    names = {p.name for p in run.path.iterdir()}
    assert {
        "recipe.yaml",
        "status.json",
        "metrics.jsonl",
        "samples.jsonl",
        "train.log",
        "checkpoints",
        "adapter",
    } <= names
    assert not [n for n in names if n.endswith(".tmp")]

    status = run.read_status()
    assert status["state"] == "completed" and status["step"] == 3 and status["total_steps"] == 3
    assert status["pid"] > 0 and status["started_at"] and status["updated_at"] and status["error"] is None

    metrics = read_jsonl(run.metrics)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert METRIC_KEYS <= set(metrics[0]), METRIC_KEYS - set(metrics[0])
    assert all(m["loss"] >= 0 and m["completion_length"] >= 1 for m in metrics)

    samples = read_jsonl(run.samples)
    assert samples and SAMPLE_KEYS <= set(samples[0])
    assert samples[0]["demonstration"] in {"cba", "olleh", "tac", "god", "eert", "noom", "rats", "yks"}

    resolved = yaml.safe_load(run.recipe.read_text())
    assert resolved["train"]["max_steps"] == 3 and resolved["loss"]["divergence"] == "forward"
    ckpt = run.checkpoints / "checkpoint-2"
    assert (ckpt / "recipe.yaml").exists() and (ckpt / "ema_shadow.pt").exists()
    assert (run.adapter / "adapter_model.safetensors").exists()
    assert json.loads((run.adapter / "adapter_config.json").read_text())["r"] == 4
    assert "train" in run.log_file.read_text()


def test_saved_adapter_loads_and_generates(tiny_model_dir, tiny_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, _, after = train_in_process(
        tiny_recipe(tiny_model_dir, tiny_data, tmp_path / "runs", train={"max_steps": 2}), tmp_path
    )
    run = RunFolder(tmp_path / "runs" / "run")
    from sdft_lite.train import save_adapter

    save_adapter(trainer.model, trainer.processing_class, run)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, run.adapter)
    loaded = dict(model.named_parameters())
    for name, value in after.items():
        if ".default." in name and "lora_" in name:
            assert torch.equal(loaded[name], value), name
    tok = AutoTokenizer.from_pretrained(run.adapter)
    out = model.generate(**tok("reverse abc", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 0


@pytest.mark.parametrize("kind", ["base", "live", "ema"])
def test_4bit_lora_trains_for_each_teacher_kind(tiny_model_dir, tiny_data, tmp_path, kind):
    recipe = tiny_recipe(
        tiny_model_dir,
        tiny_data,
        tmp_path / "runs",
        teacher={"kind": kind},
        model={"load_in_4bit": True},
        train={"max_steps": 2, "save_steps": 100},
    )
    trainer, before, after = train_in_process(recipe, tmp_path)
    quantized = [m for m in trainer.model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized, "model is not 4-bit"
    assert_lora_moved_base_frozen(before, after)
    ema = [n for n in after if ".ema." in n]
    if kind == "ema":
        assert ema
        # The EMA adapter moved toward the student, a little (rate 0.01), and matches its fp32 shadow.
        moved = [n for n in ema if not torch.equal(before[n], after[n])]
        assert moved
        for n in ema:
            assert torch.allclose(after[n], trainer.teacher.shadow[n].to(after[n].dtype))
            student = after[n.replace(".ema.", ".default.")]
            assert not torch.equal(after[n], student) or torch.equal(before[n], student)
        assert all(
            not after_p.requires_grad for n, after_p in trainer.model.named_parameters() if ".ema." in n
        )
    else:
        assert not ema
    assert trainer.state.global_step == 2


def test_ema_update_is_exact(tiny_model_dir, tiny_data, tmp_path):
    """teacher <- (1 - rate) * teacher + rate * student, in fp32, after every optimizer step."""
    recipe = load_recipe(
        None, data=tiny_recipe(tiny_model_dir, tiny_data, tmp_path / "runs", teacher={"ema_rate": 0.25})
    )
    run = RunFolder(tmp_path / "runs" / "run")
    run.prepare("error")
    trainer = build_trainer(recipe, run)
    teacher = trainer.teacher
    pairs = list(teacher._pairs())
    with torch.no_grad():
        for student, _, _ in pairs:
            student.add_(0.5)
    old = {k: v.clone() for k, v in teacher.shadow.items()}
    teacher.update(1)
    for student, ema, key in pairs:
        expected = 0.75 * old[key] + 0.25 * student.float()
        assert torch.allclose(teacher.shadow[key], expected, atol=1e-7)
        assert torch.equal(ema, teacher.shadow[key].to(ema.dtype))


def test_existing_run_is_not_overwritten(tiny_model_dir, tiny_data, tmp_path):
    recipe = tiny_recipe(tiny_model_dir, tiny_data, tmp_path / "runs", train={"max_steps": 2})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli("train", str(path), cwd=tmp_path).returncode == 0
    run = RunFolder(tmp_path / "runs" / "run")
    adapter_bytes = (run.adapter / "adapter_model.safetensors").read_bytes()
    status = run.status_file.read_text()

    res = cli("train", str(path), cwd=tmp_path)
    assert res.returncode == 2 and "already exists" in res.stderr and "--resume" in res.stderr
    assert "Traceback" not in res.stderr
    assert (run.adapter / "adapter_model.safetensors").read_bytes() == adapter_bytes
    assert run.status_file.read_text() == status

    # Resume continues from the last checkpoint to a larger budget; metrics are not duplicated.
    res = cli("train", str(path), "train.max_steps=4", "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert run.read_status()["state"] == "completed" and run.read_status()["step"] == 4
    assert [m["step"] for m in read_jsonl(run.metrics)] == [1, 2, 3, 4]
    assert "resuming from" in run.log_file.read_text()


def test_bad_rows_fail_cleanly(tiny_model_dir, tmp_path):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "x" * 200, "demonstration": "y"}, {"prompt": "ok", "demonstration": "fine"}],
    )
    recipe = tiny_recipe(tiny_model_dir, data, tmp_path / "runs")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = cli("train", str(path), cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert (
        "row 1" in res.stderr and "data.max_prompt_tokens" in res.stderr and "on_bad_row: skip" in res.stderr
    )
    assert "Traceback" not in res.stderr
    run = RunFolder(tmp_path / "runs" / "run")
    assert not run.path.exists()  # every row is checked before the run folder is made

    res = cli("train", str(path), "data.on_bad_row=skip", "--overwrite", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert run.read_status()["state"] == "completed"


def test_stop_saves_adapter(tiny_model_dir, tiny_data, tmp_path):
    recipe = tiny_recipe(
        tiny_model_dir, tiny_data, tmp_path / "runs", train={"max_steps": 100_000, "save_steps": 1_000_000}
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdft_lite.cli", "train", str(path)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = RunFolder(tmp_path / "runs" / "run")
    deadline = time.time() + 120
    while time.time() < deadline and run.read_status().get("step", 0) < 1:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    assert cli("stop", "run", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path).returncode == 0
    assert proc.wait(timeout=120) == 0
    status = run.read_status()
    assert status["state"] == "stopped" and 1 <= status["step"] < 100_000
    assert (run.adapter / "adapter_model.safetensors").exists()
    assert run.last_checkpoint() is not None  # saved so it can be resumed
    res = cli("stop", "run", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert res.returncode == 2 and "not running" in res.stderr


def test_sft_method_trains(tiny_model_dir, tiny_data, tmp_path):
    recipe = tiny_recipe(tiny_model_dir, tiny_data, tmp_path / "runs", method={"name": "sft"})
    trainer, before, after = train_in_process(recipe, tmp_path)
    assert trainer.teacher is None
    assert_lora_moved_base_frozen(before, after)


def test_sft_loss_covers_only_completion_tokens(tiny_model_dir, tiny_data, tmp_path):
    """SFT's loss == cross-entropy over the demonstration + end-of-turn token only, computed the
    plain transformers way (labels -100 on every prompt token), row by row, averaged over rows."""
    import torch.nn.functional as F

    recipe = load_recipe(
        None, data=tiny_recipe(tiny_model_dir, tiny_data, tmp_path / "runs", method={"name": "sft"})
    )
    run = RunFolder(tmp_path / "runs" / "run")
    run.prepare("error")
    trainer = build_trainer(recipe, run)
    tok, model = trainer.processing_class, trainer.model
    # The target ends with the token the chat template closes an answer with (ChatML: <|im_end|>),
    # not the padding token, which is also in the EOS set.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert trainer.encoder.end_of_turn_id(trainer.eos_ids) == im_end and tok.pad_token_id in trainer.eos_ids
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model.train()
    got = trainer._sft_loss(model, batch)

    per_row = []
    for ex in batch["examples"]:
        prompt = ex.student_ids
        target = tok(ex.demonstration, add_special_tokens=False)["input_ids"] + [im_end]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        logits = model(input_ids=ids).logits[0, :-1]
        per_row.append(F.cross_entropy(logits, labels[0, 1:], ignore_index=-100))
        # Same value from transformers' own labels path: prompt tokens carry no loss.
        assert torch.allclose(model(input_ids=ids, labels=labels).loss, per_row[-1], atol=1e-5)
    assert torch.allclose(got, torch.stack(per_row).mean(), atol=1e-5), (got, per_row)


def test_gradient_checkpointing_and_accumulation(tiny_model_dir, tiny_data, tmp_path):
    recipe = tiny_recipe(
        tiny_model_dir,
        tiny_data,
        tmp_path / "runs",
        train={"max_steps": 2, "gradient_checkpointing": True, "gradient_accumulation_steps": 2},
        generation={"num_generations": 2},
    )
    trainer, before, after = train_in_process(recipe, tmp_path)
    assert trainer.state.global_step == 2
    assert_lora_moved_base_frozen(before, after)
    assert os.path.exists(tmp_path / "runs" / "run" / "metrics.jsonl")


def test_peak_memory_is_the_training_process_own(tiny_model_dir, tiny_data, tmp_path):
    # The app starts `sdft-lite train` from a large process. Linux carries ru_maxrss across fork
    # and exec, so reading it would report the app's peak as the run's; metrics must not.
    recipe = tiny_recipe(tiny_model_dir, tiny_data, tmp_path / "runs")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    parent = (
        "import subprocess, sys\n"
        "x = bytearray(2 * 2**30)\n"
        "for i in range(0, len(x), 4096): x[i] = 1\n"
        "del x\n"
        "cmd = [sys.executable, '-m', 'sdft_lite.cli', 'train', sys.argv[1], 'train.max_steps=1']\n"
        "sys.exit(subprocess.run(cmd).returncode)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", parent, str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    peaks = [m["peak_memory_mb"] for m in read_jsonl(RunFolder(tmp_path / "runs" / "run").metrics)]
    assert peaks and all(0 < p < 1500 for p in peaks), peaks  # a tiny run; the parent peaked at 2 GiB

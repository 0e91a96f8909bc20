"""GPU smoke test: 5 SDFT steps of a small recipe with backend hf and with backend unsloth.

    pytest -m gpu tests/gpu -s

Needs CUDA (skipped without it); the unsloth half also needs `pip install "sdft-lite[unsloth]"`.
Model: $SDFT_GPU_MODEL (Hub id or local folder), default unsloth/Qwen2.5-0.5B-Instruct. It must
be available offline (a local folder, or cached: `hf download unsloth/Qwen2.5-0.5B-Instruct`),
unless SDFT_GPU_DOWNLOAD=1 lets the runs download it.

Each backend trains in its own `sdft-lite train` process (Unsloth patches transformers for the
whole process it is imported in). Rollouts use top_k 1, so both backends sample the same
completions and their first-step losses (student = base model, EMA teacher = student) must
agree. Prints first-step loss, peak VRAM, seconds per step and the plan's estimate.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[2]
MODEL = os.environ.get("SDFT_GPU_MODEL", "unsloth/Qwen2.5-0.5B-Instruct")
DOWNLOAD = os.environ.get("SDFT_GPU_DOWNLOAD", "0") == "1"
STEPS = 5
# Loss at step 1 is a KL of a few tenths; 4-bit bf16 kernels differ in rounding, not in result.
RTOL, ATOL = 0.15, 0.02


def model_available() -> str | None:
    """None when MODEL can be loaded here, else why not."""
    if Path(MODEL).expanduser().is_dir() or DOWNLOAD:
        return None
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(MODEL, local_files_only=True)
        return None
    except Exception:
        return (
            f"{MODEL} is not available offline: `hf download {MODEL}`, set SDFT_GPU_MODEL to a local "
            "folder, or SDFT_GPU_DOWNLOAD=1"
        )


def recipe(backend: str, data: Path, out: Path) -> dict:
    return {
        "model": {
            "name": MODEL,
            "backend": backend,
            "load_in_4bit": True,
            "max_seq_length": 1024,
            "lora": {"r": 16, "alpha": 32},
        },
        "data": {"source": str(data), "max_prompt_tokens": 128, "max_teacher_prompt_tokens": 384},
        "generation": {"max_new_tokens": 64, "top_k": 1},
        "teacher": {"kind": "ema"},
        "train": {
            "max_steps": STEPS,
            "batch_size": 4,
            "learning_rate": 1e-4,
            "gradient_checkpointing": True,
            "save_steps": 1000,
            "sample_steps": 1000,
            "seed": 0,
            "lr_scheduler": "constant",
        },
        "eval": {"before": False, "after": False},
        "output": {"dir": str(out), "name": backend, "if_exists": "overwrite"},
    }


def write_data(path: Path) -> Path:
    rows = []
    for a in range(2, 12):
        for b in (3, 7):
            rows.append(
                {
                    "prompt": f"What is {a} times {b}? Answer with the number only.",
                    "demonstration": f"{a} times {b} is {a * b}. The answer is {a * b}.",
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return {}


def train(backend: str, results: dict, tmp: Path) -> dict:
    if backend in results:
        return results[backend]
    import yaml

    why = model_available()
    if why:
        pytest.skip(why)
    if backend == "unsloth":
        from sdft_lite.backends import INSTALL_UNSLOTH, unsloth_installed

        if not unsloth_installed():
            pytest.skip(f"unsloth is not installed: {INSTALL_UNSLOTH}")
    spec = recipe(backend, write_data(tmp / "train.jsonl"), tmp / "runs")
    path = tmp / f"{backend}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    if not DOWNLOAD:
        env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "sdft_lite.cli", "train", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=1800,
    )
    run = tmp / "runs" / backend
    assert done.returncode == 0, done.stderr[-4000:]
    log = (run / "train.log").read_text(encoding="utf-8")
    assert f"backend {backend}" in log, "train did not dispatch to the requested backend (see train.log)"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]

    from sdft_lite.config import load_recipe
    from sdft_lite.plan import GiB, plan_recipe

    plan = plan_recipe(load_recipe(None, data=spec))
    results[backend] = {
        "steps": len(metrics),
        "first_loss": metrics[0]["loss"],
        "losses": [m["loss"] for m in metrics],
        "peak_vram_gib": max(m["peak_memory_mb"] for m in metrics) / 1024,
        "s_per_step": statistics.median(m["seconds_per_step"] for m in metrics[1:]),
        "plan_gib": (plan.total - plan.phase_bytes("overhead")) / GiB,
    }
    r = results[backend]
    print(
        f"\n[{backend}] {torch.cuda.get_device_name()}: losses {[round(x, 4) for x in r['losses']]}, "
        f"peak VRAM {r['peak_vram_gib']:.2f} GiB (plan, allocator part: {r['plan_gib']:.2f} GiB), "
        f"{r['s_per_step']:.2f} s/step"
    )
    return r


@pytest.mark.parametrize("backend", ["hf", "unsloth"])
def test_five_steps(backend, results, tmp_path_factory):
    r = train(backend, results, tmp_path_factory.mktemp(backend))
    assert r["steps"] == STEPS and all(x == x for x in r["losses"])  # no NaN


def test_first_step_losses_agree(results, tmp_path_factory):
    hf = train("hf", results, tmp_path_factory.mktemp("hf"))
    un = train("unsloth", results, tmp_path_factory.mktemp("unsloth"))
    print(
        f"\nfirst-step loss: hf {hf['first_loss']:.4f}, unsloth {un['first_loss']:.4f}; "
        f"s/step hf {hf['s_per_step']:.2f}, unsloth {un['s_per_step']:.2f}; "
        f"peak VRAM hf {hf['peak_vram_gib']:.2f} GiB, unsloth {un['peak_vram_gib']:.2f} GiB"
    )
    assert abs(hf["first_loss"] - un["first_loss"]) <= ATOL + RTOL * max(
        abs(hf["first_loss"]), abs(un["first_loss"])
    )

"""GPU smoke tests: short SDFT runs with backend hf and with backend unsloth, offline.

    python -m pytest -m gpu tests/gpu -s

NOT YET RUN ON A GPU: these tests were written on a CPU-only machine, where they collect and
skip; the first CUDA run may need fixes (tolerances, Unsloth details). Skipped without CUDA; the
unsloth half also needs `pip install "sdft-lite[unsloth]"`.

Model: $SDFT_GPU_MODEL (Hub id or local folder) when set; else unsloth/Qwen2.5-0.5B-Instruct when
it is in the local Hugging Face cache; else, offline, a random-weight model built from
Qwen2.5-0.5B-Instruct's config (Qwen2, 24 layers, hidden 896, vocabulary 151936) with a
byte-level tokenizer made on the spot (Qwen's special-token ids). Random weights exercise every
code path and the real shapes and memory; accuracies are meaningless (0 %). SDFT_GPU_DOWNLOAD=1
lets the runs download a Hub model instead.

What runs, each training in its own `sdft-lite train` process (Unsloth patches transformers for
the whole process it is imported in); estimated 5-7 minutes for all of it on one recent GPU
(an estimate: not measured yet), each command capped at 10 minutes:
- per backend, the EMA teacher with 2 generations per prompt, sampled (temperature 1),
  `loss.is_clip` on, 4-bit, `model.dtype: auto`, evaluation before and after training;
- per backend, the base teacher in float16 (`model.dtype: float16`), greedy rollouts;
- `sdft-lite export` of the unsloth run (merged 16-bit folder), loaded back with transformers.

The backends need not sample the same completions (different kernels round differently, and
a greedy step can flip on a near tie): losses are compared as statistics, and per-token
log-probabilities only over the common prefix of the two backends' greedy completions.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = "unsloth/Qwen2.5-0.5B-Instruct"
DOWNLOAD = os.environ.get("SDFT_GPU_DOWNLOAD", "0") == "1"
STEPS = 4
# Qwen2.5-0.5B-Instruct's config.json (the sizes and the rules that shape the computation).
QWEN_05B_CONFIG = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    max_window_layers=21,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    hidden_act="silu",
    tie_word_embeddings=True,
    use_sliding_window=False,
    bos_token_id=151643,
    eos_token_id=151645,
)
QWEN_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Per-token log-probabilities of the same token after the same prefix: 4-bit kernels of the two
# backends differ in rounding, not in result.
LOGPROB_ATOL, LOGPROB_RTOL = 0.05, 0.02


# --------------------------------------------------------------------------- the model


def _cached(name: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(name, local_files_only=True)
        return True
    except Exception:
        return False


def build_random_qwen(folder: Path, device: str = "cuda", **config) -> Path:
    """A random-weight Qwen2.5-0.5B-shaped model folder with a byte-level BPE tokenizer (no
    merges: one token per byte) padded with filler tokens to the full vocabulary, Qwen's special
    tokens at Qwen's ids. transformers loads it as Qwen2Tokenizer; text round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab_size = QWEN_05B_CONFIG["vocab_size"]
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"<x{i}>": i for i in range(len(vocab), min(QWEN_SPECIALS.values()))})
    vocab.update(QWEN_SPECIALS)
    vocab.update({f"<y{i}>": i for i in range(max(QWEN_SPECIALS.values()) + 1, vocab_size)})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    with torch.device(device):  # `config` shrinks it, e.g. for a dry run of this file on a CPU
        model = Qwen2ForCausalLM(Qwen2Config(**{**QWEN_05B_CONFIG, **config}))
    model.generation_config.update(eos_token_id=[151645, 151643], pad_token_id=151643)
    model.to(torch.bfloat16).save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


@pytest.fixture(scope="module")
def model_name(tmp_path_factory) -> str:
    name = os.environ.get("SDFT_GPU_MODEL")
    if name:
        if not (Path(name).expanduser().is_dir() or DOWNLOAD or _cached(name)):
            pytest.skip(f"{name} is not available offline: `hf download {name}`, or SDFT_GPU_DOWNLOAD=1")
        return name
    if DOWNLOAD or _cached(DEFAULT_MODEL):
        return DEFAULT_MODEL
    start = time.time()
    folder = build_random_qwen(tmp_path_factory.mktemp("random-qwen2.5-0.5b"))
    print(f"\nbuilt a random-weight Qwen2.5-0.5B-shaped model in {time.time() - start:.0f} s: {folder}")
    return str(folder)


# --------------------------------------------------------------------------- recipes and runs


def write_data(folder: Path) -> tuple[Path, Path]:
    rows = [
        {
            "prompt": f"What is {a} times {b}? Answer with the number only.",
            "demonstration": f"{a} times {b} is {a * b}. The answer is {a * b}.",
            "answer": str(a * b),
        }
        for a in range(2, 12)
        for b in (3, 7)
    ]
    train, evals = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:16]), encoding="utf-8")
    evals.write_text("".join(json.dumps(r) + "\n" for r in rows[16:]), encoding="utf-8")
    return train, evals


def recipe(model_path: str, backend: str, data: tuple[Path, Path], out: Path, name: str, **over) -> dict:
    """The main run: EMA teacher, 2 sampled generations per prompt, is_clip, eval before and after."""
    spec = {
        "model": {
            "name": model_path,
            "backend": backend,
            "load_in_4bit": True,
            "dtype": "auto",
            "max_seq_length": 1024,
            "lora": {"r": 16, "alpha": 32},
        },
        "data": {
            "source": str(data[0]),
            "eval_source": str(data[1]),
            "answer_column": "answer",
            "max_prompt_tokens": 128,
            "max_teacher_prompt_tokens": 384,
        },
        "generation": {"num_generations": 2, "max_new_tokens": 48, "temperature": 1.0},
        "teacher": {"kind": "ema"},
        "loss": {"is_clip": 2.0, "skip_first_tokens": 0},
        "train": {
            "max_steps": STEPS,
            "batch_size": 2,
            "learning_rate": 1e-4,
            "gradient_checkpointing": True,
            "save_steps": 1000,
            "sample_steps": 1,
            "seed": 0,
            "lr_scheduler": "constant",
        },
        "eval": {"before": True, "after": True, "teacher": False, "limit": 4, "max_new_tokens": 8},
        "output": {"dir": str(out), "name": name, "if_exists": "overwrite"},
    }
    for key, value in over.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def _env() -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    if not DOWNLOAD:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdft_lite.cli", *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=cwd,
        timeout=timeout,
    )


def train(spec: dict, tmp: Path) -> dict:
    import yaml

    backend = spec["model"]["backend"]
    if backend == "unsloth":
        from sdft_lite.backends import INSTALL_UNSLOTH, unsloth_installed

        if not unsloth_installed():
            pytest.skip(f"unsloth is not installed: {INSTALL_UNSLOTH}")
    path = tmp / f"{spec['output']['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    start = time.time()
    done = cli("train", str(path), cwd=tmp)
    run = Path(spec["output"]["dir"]) / spec["output"]["name"]
    assert done.returncode == 0, done.stderr[-4000:]
    log = (run / "train.log").read_text(encoding="utf-8")
    assert f"backend {backend}" in log, "train did not dispatch to the requested backend (see train.log)"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    steps = [m for m in records if "loss" in m]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines() if line.strip()]

    from sdft_lite.config import load_recipe
    from sdft_lite.plan import GiB, plan_recipe

    plan = plan_recipe(load_recipe(None, data=spec))
    r = {
        "run": run,
        "log": log,
        "steps": steps,
        "samples": samples,
        "losses": [m["loss"] for m in steps],
        "peak_vram_gib": max(m["peak_memory_mb"] for m in steps) / 1024,
        "s_per_step": statistics.median(m["seconds_per_step"] for m in steps[1:] or steps),
        "plan_gib": (plan.total - plan.phase_bytes("overhead")) / GiB,
        "wall_s": time.time() - start,
    }
    print(
        f"\n[{spec['output']['name']}] {torch.cuda.get_device_name()}: losses "
        f"{[round(x, 4) for x in r['losses']]}, peak VRAM {r['peak_vram_gib']:.2f} GiB (plan, allocator "
        f"part: {r['plan_gib']:.2f} GiB), {r['s_per_step']:.2f} s/step, {r['wall_s']:.0f} s in all"
    )
    return r


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return write_data(tmp_path_factory.mktemp("data"))


RESULTS: dict[str, dict] = {}


def run_once(key: str, model_path: str, backend: str, data, tmp_path_factory, **over) -> dict:
    if key not in RESULTS:
        tmp = tmp_path_factory.mktemp(key)
        RESULTS[key] = train(recipe(model_path, backend, data, tmp / "runs", key, **over), tmp)
    return RESULTS[key]


def main_run(backend, model_name, data, tmp_path_factory) -> dict:
    return run_once(f"ema-{backend}", model_name, backend, data, tmp_path_factory)


def fp16_run(backend, model_name, data, tmp_path_factory) -> dict:
    return run_once(
        f"fp16-base-{backend}",
        model_name,
        backend,
        data,
        tmp_path_factory,
        model={"dtype": "float16"},
        teacher={"kind": "base"},
        generation={"num_generations": 1, "top_k": 1},
        loss={"is_clip": None, "skip_first_tokens": 0},
        train={"max_steps": 3, "gradient_checkpointing": False},
        eval={"before": False, "after": False},
    )


# --------------------------------------------------------------------------- tests


def _finite(xs) -> bool:
    return bool(xs) and all(math.isfinite(x) for x in xs)


@pytest.mark.parametrize("backend", ["hf", "unsloth"])
def test_ema_teacher_two_generations_is_clip_and_evaluation(backend, model_name, data, tmp_path_factory):
    from sdft_lite.models import choose_dtype

    r = main_run(backend, model_name, data, tmp_path_factory)
    assert len(r["steps"]) == STEPS and _finite(r["losses"])
    expected = choose_dtype("auto", "cuda", torch.cuda.get_device_capability())
    assert f"dtype {expected}" in r["log"], "model.dtype auto did not load the dtype the rule picks"
    first = [s for s in r["samples"] if s["step"] == 0]
    assert len(first) == 2 and first[0]["row"] == first[1]["row"], "2 generations of the first prompt"
    ev = json.loads((r["run"] / "eval.json").read_text())
    assert {"before", "after"} <= set(ev)
    assert all(0.0 <= res["accuracy"] <= 1.0 for res in ev["after"].values() if isinstance(res, dict))


@pytest.mark.parametrize("backend", ["hf", "unsloth"])
def test_base_teacher_in_float16(backend, model_name, data, tmp_path_factory):
    """model.dtype float16 loads float16 and trains with fp16 mixed precision on any GPU."""
    r = fp16_run(backend, model_name, data, tmp_path_factory)
    assert len(r["steps"]) == 3 and _finite(r["losses"])
    assert "dtype float16" in r["log"]


def test_backends_agree_in_statistics(model_name, data, tmp_path_factory):
    """Sampled completions differ between backends: compare the runs' loss levels, not values."""
    hf = main_run("hf", model_name, data, tmp_path_factory)
    un = main_run("unsloth", model_name, data, tmp_path_factory)
    a, b = statistics.mean(hf["losses"]), statistics.mean(un["losses"])
    print(
        f"\nmean loss hf {a:.4f}, unsloth {b:.4f}; s/step hf {hf['s_per_step']:.2f}, unsloth "
        f"{un['s_per_step']:.2f}; peak VRAM hf {hf['peak_vram_gib']:.2f}, unsloth {un['peak_vram_gib']:.2f} GiB"
    )
    assert a >= 0 and b >= 0
    assert max(a, b) <= 3 * min(a, b) + 0.05, "the backends' loss levels differ by more than 3x"


def test_backends_agree_on_the_common_prefix_of_greedy_completions(model_name, data, tmp_path_factory):
    """Same prompt, same model, greedy: wherever the two completions still agree token for token,
    the student's and the teacher's log-probabilities of those tokens must agree too."""
    hf = fp16_run("hf", model_name, data, tmp_path_factory)
    un = fp16_run("unsloth", model_name, data, tmp_path_factory)
    first = {
        name: {s["row"]: s["tokens"] for s in r["samples"] if s["step"] == 0}
        for name, r in (("hf", hf), ("unsloth", un))
    }
    compared, worst = 0, 0.0
    for row in set(first["hf"]) & set(first["unsloth"]):
        for x, y in zip(first["hf"][row], first["unsloth"][row], strict=False):
            if x["token"] != y["token"]:
                break
            for side in ("student", "teacher"):
                diff = abs(x[side] - y[side])
                worst = max(worst, diff)
                assert diff <= LOGPROB_ATOL + LOGPROB_RTOL * abs(x[side]), (row, x, y)
            compared += 1
    print(f"\ncompared {compared} tokens of common greedy prefix; largest log-prob difference {worst:.4f}")
    if not compared:
        pytest.skip("the backends' greedy completions differ from their first token: nothing to compare")


def test_export_merged_16bit(model_name, data, tmp_path_factory):
    r = main_run("unsloth", model_name, data, tmp_path_factory)
    out = r["run"].parent / "export"
    start = time.time()
    done = cli("export", str(r["run"]), "--out", str(out), cwd=r["run"].parent)
    assert done.returncode == 0, done.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files), files
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map={"": 0})
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("What is 3 times 7?", return_tensors="pt").to("cuda")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
    print(f"\nexported and reloaded in {time.time() - start:.0f} s: {files}")

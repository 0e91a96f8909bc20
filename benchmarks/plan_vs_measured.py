"""`sdft-lite plan`'s estimate against the measured peak memory of real training steps, on CPU.

    python benchmarks/plan_vs_measured.py [--steps 3] [--only NAME ...] [--out benchmarks/results/plan_vs_measured.json]

For each config below a small random Llama-architecture model (hidden 512, vocab 32k: big enough
that tensors, not interpreter noise, dominate) is saved to a temp folder, then a subprocess
imports everything, takes its resident set as the baseline, builds the trainer with
`sdft_lite.train.build_trainer` (loads the weights), and runs `--steps` SDFT steps. Measured:

  end     RSS after the steps - baseline         vs the plan's static memory less the LoRA gradients
                                                (weights, adapter(s), EMA shadow, optimizer states;
                                                the Trainer frees gradients after each step)
  peak    peak RSS during the steps - baseline  vs the plan's total (static + largest phase)

(RSS right after loading says little: safetensors weights are memory-mapped and count only once
a forward has touched them.)

Pages of the memory-mapped checkpoint that no live tensor uses are dropped after loading (see
`_drop_checkpoint_pages`), so the fp32 file behind 4-bit weights is not counted.

The data fill every length limit (student prompt, teacher prompt after truncation, and the
random model never samples EOS from 32k tokens, so completions reach max_new_tokens), which is
the case the plan describes. Workers run with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors are
returned to the OS and RSS tracks live memory (see benchmarks/loss_memory.py).

What CPU changes compared with the GPU the plan is for: compute is float32 (dtype auto = 4
bytes, not 2), there is no CUDA context, and on CPU the peak RSS also holds PyTorch's CPU
kernels' scratch buffers and the autograd graph's Python objects, which the plan does not
count. bitsandbytes 4-bit does run on CPU, so the 4-bit configs quantize as on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LIVE_MEMORY_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}
MODEL = dict(hidden=512, layers=6, heads=8, kv_heads=4, intermediate=1408, vocab=32000)
BASE = dict(
    model={"backend": "hf", "load_in_4bit": False, "max_seq_length": 512, "lora": {"r": 16, "alpha": 32}},
    data={"max_prompt_tokens": 64, "max_teacher_prompt_tokens": 192, "chat_template": "never"},
    generation={"max_new_tokens": 64},
    train={
        "batch_size": 4,
        "learning_rate": 1e-3,
        "gradient_checkpointing": False,
        "save_steps": 1000,
        "sample_steps": 1000,
        "logging_steps": 1,
    },
    teacher={"kind": "base"},
)
# name -> overrides of BASE (section -> keys)
CONFIGS = {
    "fp32 base-teacher": {},
    "fp32 +checkpointing": {"train": {"gradient_checkpointing": True}},
    "fp32 ema-teacher": {"teacher": {"kind": "ema"}},
    "fp32 batch 8, 128 new": {
        "train": {"batch_size": 8},
        "generation": {"max_new_tokens": 128},
        "model": {"max_seq_length": 512},
    },
    "4-bit ema +checkpointing": {
        "model": {"load_in_4bit": True},
        "teacher": {"kind": "ema"},
        "train": {"gradient_checkpointing": True},
    },
    "4-bit batch 8, r 64": {
        "model": {"load_in_4bit": True, "lora": {"r": 64, "alpha": 64}},
        "train": {"batch_size": 8},
    },
}


def build_model_dir(out: Path, sizes: dict = MODEL, seed: int = 0) -> dict:
    """A random Llama model + a character tokenizer padded with filler tokens to the model's vocab."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"-+=*/()[]{}<>_\n")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    tokens = specials + chars
    tokens += [f"<x{i}>" for i in range(sizes["vocab"] - len(tokens))]
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=sizes["vocab"],
        hidden_size=sizes["hidden"],
        intermediate_size=sizes["intermediate"],
        num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"],
        num_key_value_heads=sizes["kv_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=0,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    return cfg.to_dict()


def write_data(path: Path, rows: int = 32, prompt_chars: int = 64, seed: int = 0) -> Path:
    """Prompts exactly `prompt_chars` tokens long; demonstrations long enough to be truncated."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            prompt = "".join(rng.choice(letters) for _ in range(prompt_chars))
            demo = "".join(rng.choice(letters) for _ in range(600))
            f.write(json.dumps({"prompt": prompt, "demonstration": demo}) + "\n")
    return path


def recipe_dict(overrides: dict, model_dir: Path, data: Path, out: Path, steps: int) -> dict:
    recipe = json.loads(json.dumps(BASE))
    for section, values in overrides.items():
        for key, value in values.items():
            if isinstance(value, dict):
                recipe[section].setdefault(key, {}).update(value)
            else:
                recipe[section][key] = value
    recipe["model"]["name"] = str(model_dir)
    recipe["data"]["source"] = str(data)
    recipe["train"]["max_steps"] = steps
    recipe["output"] = {"dir": str(out), "name": "run", "if_exists": "overwrite"}
    return recipe


# --------------------------------------------------------------------------- worker


def _status_kib(field: str) -> int:
    from sdft_lite.memory import proc_status_kib

    kib = proc_status_kib(field)
    if kib is None:
        raise RuntimeError(f"/proc/self/status has no {field} (this benchmark needs Linux)")
    return kib


def _drop_checkpoint_pages() -> None:
    """Drop the pages of memory-mapped .safetensors files from this process's RSS.

    transformers keeps the checkpoint mapped after loading (tensors it did not convert are views
    into it), and every page it read while loading, e.g. the fp32 weights that 4-bit loading
    quantized into new tensors, stays in RSS as clean file-backed memory that no live tensor uses.
    MADV_DONTNEED drops them; pages of live views fault back in on their next use and count again.
    Safe here because nothing writes to the frozen base weights (the mapping is private).
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(".safetensors"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            libc.madvise(lo, hi - lo, 4)  # MADV_DONTNEED


def _worker(spec: dict) -> dict:
    import torch
    import transformers  # noqa: F401

    from sdft_lite.config import load_recipe
    from sdft_lite.memory import reset_peak_rss
    from sdft_lite.plan import GiB, estimate
    from sdft_lite.runs import RunFolder
    from sdft_lite.train import build_trainer
    from sdft_lite.trainer import SDFTTrainer  # noqa: F401  (import cost is not the run's memory)

    # One small autograd step so thread pools and kernel caches exist before the baseline.
    x = torch.randn(256, 256, requires_grad=True)
    (x @ x).sum().backward()
    del x
    gc.collect()
    baseline = _status_kib("VmRSS")

    recipe = load_recipe(None, data=spec["recipe"])
    run = RunFolder(Path(recipe.output.dir) / recipe.output.name)
    run.prepare("overwrite")
    trainer = build_trainer(recipe, run)
    gc.collect()
    _drop_checkpoint_pages()
    if not reset_peak_rss():
        raise RuntimeError("cannot reset VmHWM through /proc/self/clear_refs (needs Linux >= 4.0)")
    trainer.train()
    peak = _status_kib("VmHWM")
    gc.collect()
    end = _status_kib("VmRSS")

    plan = estimate(recipe, spec["config"], device="cpu", backend="hf")
    lora = plan.arch.lora_params(plan.settings.lora_r, plan.settings.targets)
    return {
        "name": spec["name"],
        "estimate_end_mib": (plan.phase_bytes("static") - 4 * lora) / 2**20,
        "measured_end_mib": (end - baseline) / 1024,
        "estimate_peak_mib": plan.total / 2**20,
        "measured_peak_mib": (peak - baseline) / 1024,
        "estimate_phases_mib": {
            p: plan.phase_bytes(p) / 2**20 for p in ("static", "rollout", "teacher", "student")
        },
        "peak_phase": plan.peak_phase,
        "estimate_total_gib": plan.total / GiB,
        "params_m": plan.arch.total_params / 1e6,
    }


def _run(name: str, recipe: dict, config: dict) -> dict:
    spec = json.dumps({"name": name, "recipe": recipe, "config": config})
    env = {
        **os.environ,
        **LIVE_MEMORY_ENV,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps per config")
    parser.add_argument("--only", nargs="*", help="config names to run (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "plan_vs_measured.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return

    names = args.only or list(CONFIGS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = build_model_dir(tmp / "model")
        data = write_data(tmp / "train.jsonl", prompt_chars=BASE["data"]["max_prompt_tokens"])
        header = (
            f"{'config':26} {'end est':>8} {'measured':>9} {'peak est':>9} {'measured':>9} "
            f"{'meas/est':>8}  peak phase (est)"
        )
        print(
            f"model: {MODEL}; memory in MiB over the process baseline; {args.steps} steps\n{header}\n{'-' * len(header)}"
        )
        for name in names:
            r = _run(name, recipe_dict(CONFIGS[name], tmp / "model", data, tmp / "runs", args.steps), config)
            rows.append(r)
            print(
                f"{name:26} {r['estimate_end_mib']:8.0f} {r['measured_end_mib']:9.0f} "
                f"{r['estimate_peak_mib']:9.0f} {r['measured_peak_mib']:9.0f} "
                f"{r['measured_peak_mib'] / r['estimate_peak_mib']:8.2f}  {r['peak_phase']}",
                flush=True,
            )
    import torch

    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "model": MODEL,
        "base_recipe": BASE,
        "configs": CONFIGS,
        "steps": args.steps,
        "measured": "RSS growth over a process that has imported everything (MALLOC_MMAP_THRESHOLD_=65536)",
        "estimate": "sdft_lite.plan.estimate(recipe, config, device='cpu', backend='hf')",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")


if __name__ == "__main__":
    main()

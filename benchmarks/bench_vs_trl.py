"""sdft-lite vs TRL's SDFTTrainer on the same work: seconds/step, tokens/s, peak memory, and the floor.

    python benchmarks/bench_vs_trl.py             # default table + profile, ~12 min on a 2-core CPU
    python benchmarks/bench_vs_trl.py --sweep     # completion 64..512 x vocab 32000/151936, both tools
    python benchmarks/bench_vs_trl.py --steps 6 --warmup 2 --repeats 3 --profile-tools sdft-lite,trl

On a CUDA GPU the default dtype is bfloat16 and, with unsloth installed, a third tool runs:
sdft-lite-unsloth (sdft-lite with model.backend unsloth), compared with TRL like sdft-lite (hf).

Same work. One temp model folder per vocabulary: a random Llama-architecture model shaped like a small
Qwen2 (hidden 128, 2 layers, 4/2 GQA heads, q/k/v bias, tied embeddings) and a character tokenizer
padded with filler tokens to exactly the model's vocabulary, so tokenizer and output head agree.
(Llama, not qwen2: transformers 5 loads a qwen2 folder's tokenizer as Qwen2Tokenizer.) The data is a
generated JSONL whose prompts (64 tokens) and demonstrations (192) all have one length, so every batch
has the same shapes in both tools whatever rows their samplers pick. Both tools get: LoRA r 16 on
every linear layer, 4 prompts x 1 generation, temperature 1 with no top-k/top-p, the teacher prompt
"{prompt}\\n\\n{demonstration}", forward KL over the full vocabulary (or over the student's top-100
plus a tail bucket), the first 3 completion tokens left out, teacher `base` (the student with its
adapter off: TRL's default; their `ema` starts from zeros at rate 0.05, ours from the student's init
at 0.01), fp32, no 4-bit, no gradient checkpointing (TRL defaults to it and to bf16 autocast), AdamW
lr 1e-4. Completions run to exactly `--completion` tokens at no per-step cost: the end tokens are
unreachable by construction (see build_model_folder); a min_new_tokens processor would add two
[batch, vocab] passes per generated token to both tools. The table shows the lengths each generated.

Measured. Each (tool, config) trains in its own subprocess; a TrainerCallback times every optimizer
step (on_step_begin -> on_step_end, median after the warm-up), the process CPU time of the step
(user + sys: far less sensitive than wall time to other tenants of a shared machine), the time in
the rollout (gen %: sdft-lite's generate_rollouts, TRL's _generate), and the peak RSS (VmHWM of the
child's own address space: ru_maxrss would include this parent's peak, which Linux carries across
fork and exec, see sdft_lite/memory.py) or CUDA max_memory_allocated. RSS also counts what glibc keeps of freed blocks: sdft-lite's train
path lowers glibc's mmap threshold itself, TRL runs with glibc's defaults (set MALLOC_MMAP_THRESHOLD_
=65536 in the environment to give TRL the same; sdft-lite's own mallopt call still wins). Runs are
repeated, interleaved with alternating tool order; the least disturbed run (lowest median) is kept,
peak memory is the worst run's. OMP_WAIT_POLICY=PASSIVE by default: on a loaded 2-core box
spinning OpenMP threads make small ops several times slower, which would measure the neighbours.

The floors. FLOP floor: matmul FLOPs of one step over this machine's matmul rate (best 2048^3
torch.matmul, same run: measured before and after the runs, the higher rate kept, so that a slow
spell during one measurement cannot lower the floor; every rate below likewise). Rollout: prompt
+ completion tokens x 2P, plus 2HV per token for the last-position head, plus causal attention;
teacher forward over teacher prompt + completion with the head on completion positions; student
forward + backward, where the backward of a frozen weight (the base layers and the tied head: no
weight gradient) is one more product, the input's gradient, and that of the LoRA weights and of
attention two. P = non-embedding weights incl. LoRA.
Roofline floor: the same, with the rollout head priced at the larger of its FLOP time and the time
to read its whole weight once per token at this machine's measured read rate (best `sum()` over
the head itself): a bound on any exact implementation that reads the fp32 head, memory-bound on a
CPU (sdft-lite's rollout draws through an int8 copy of it where that is faster, exactly, by
rejection: sampling.Int8Proposal; its head can then go below this). Decode-bound floor: the
rollout head at the measured rate of its real fp32 product [4, H] x [H, V] (the fastest of the
three layouts sampling.head_layout picks from): what the BLAS at hand allows. Softmax, KL and
sampling are not counted.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 128, 2, 4, 2, 512
LORA_R, BATCH, GENERATIONS, SKIP_TOKENS, TOPK, SEED = 16, 4, 1, 3, 100, 42
PROMPT_TOKENS, DEMO_TOKENS, ROWS = 64, 192, 64  # character tokenizer: one token per character
TEACHER_PROMPT_TOKENS = PROMPT_TOKENS + 2 + DEMO_TOKENS
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"-+=*/()[]{}<>_\n")
SPECIALS = ["<|endoftext|>", "<|im_end|>", "<unk>"]  # pad, eos: both in both tools' EOS sets
EOS_IDS = [1, 0]


# --------------------------------------------------------------------------- model, data, floor (parent)
def build_model_folder(folder: Path, vocab: int, dtype: str) -> None:
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokens = SPECIALS + CHARS + [f"<x{i}>" for i in range(vocab - len(SPECIALS) - len(CHARS))]
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            attention_bias=True,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            eos_token_id=EOS_IDS,
            pad_token_id=0,
            bos_token_id=None,
        )
    )
    with torch.no_grad():  # end tokens unreachable: every completion runs to max_new_tokens
        emb = model.get_input_embeddings().weight  # tied: also the output head
        emb[:, 0] = 1.0  # a constant coordinate: the residual keeps x_0 ~ 1, so the final h_0 ~ 11 > 0,
        emb[EOS_IDS, 0] = -5.0  # and the end tokens' logits sit 6 * h_0 (~65 nats) below the rest
    model.generation_config.update(eos_token_id=EOS_IDS, pad_token_id=0)
    model.to(getattr(torch, dtype)).save_pretrained(folder)


def write_data(path: Path) -> None:
    rng = random.Random(SEED)
    rows = []
    for i in range(ROWS):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(PROMPT_TOKENS - 20))
        demo = f"The reverse is {word[::-1]}. " + "Reading from the end, one letter at a time. " * 5
        rows.append({"prompt": f"q{i:03d}: reverse this: {word}", "demonstration": demo[:DEMO_TOKENS]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def matmul_rates(device: str, dtype: str, vocabs: list[int]) -> dict:
    """FLOP/s: best of a few 2048^3 matmuls, and of the decode-time head [4, H] x [H, V] per vocabulary
    (in the fastest of the three layouts a rollout may use); bytes/s: best read of each head weight."""
    import torch

    def best(fn, work: float, reps: int) -> float:
        times = []
        for _ in range(reps + 1):  # the first call warms up
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return work / min(times[1:])

    a, b = (torch.randn(2048, 2048, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    h = torch.randn(BATCH, HIDDEN, device=device, dtype=a.dtype)
    heads = {v: torch.randn(v, HIDDEN, device=device, dtype=a.dtype) for v in vocabs}
    heads_t = {v: w.T.contiguous() for v, w in heads.items()}
    # The head as stored ([V, H], used transposed), pre-transposed ([H, V]) and vocabulary-major
    # ([V, H] x [H, B], logits [V, B]): the fastest one counts (sampling.head_layout).
    return {
        "matmul_flops": best(lambda: a @ b, 2 * 2048**3, 5),
        "decode_head_flops": {
            v: max(
                best(lambda w=w: h @ w.T, 2 * BATCH * HIDDEN * v, 20),
                best(lambda w=heads_t[v]: h @ w, 2 * BATCH * HIDDEN * v, 20),
                best(lambda w=w: w @ h.T, 2 * BATCH * HIDDEN * v, 20),
            )
            for v, w in heads.items()
        },
        # A reduction reads every byte once and writes nothing: the rate a memory-bound head read
        # cannot beat (a head small enough to stay in cache reads faster, and so counts faster).
        "head_read_bytes": {v: best(lambda w=w: w.sum(), w.nbytes, 20) for v, w in heads.items()},
    }


def best_rates(a: dict, b: dict) -> dict:
    """Each rate (FLOP/s, bytes/s, per vocabulary where it is per vocabulary) the higher of a and b."""
    return {
        k: {v: max(a[k][v], b[k][v]) for v in a[k]} if isinstance(a[k], dict) else max(a[k], b[k]) for k in a
    }


def floor(r: dict, rates: dict) -> dict:
    """Matmul FLOPs of one step and the three floors (see the module docstring)."""
    kv = KV_HEADS * HIDDEN // HEADS
    shapes = [(HIDDEN, HIDDEN), (HIDDEN, kv), (HIDDEN, kv), (HIDDEN, HIDDEN)] + [(HIDDEN, INTERMEDIATE)] * 2
    shapes.append((INTERMEDIATE, HIDDEN))
    frozen = LAYERS * sum(i * o for i, o in shapes)  # base weights: no gradient of their own
    lora = LAYERS * sum(LORA_R * (i + o) for i, o in shapes)
    t, vocab, rows = r["completion"], r["vocab"], BATCH * GENERATIONS
    head = 2 * HIDDEN * vocab  # per scored or generated position

    def forward(prompt: int) -> dict:
        """One row: all tokens through the decoder, the head on the completion positions."""
        n = prompt + t
        return {
            "frozen": n * 2 * frozen + t * head,
            "lora": n * 2 * lora,
            "attention": 2 * LAYERS * HIDDEN * n * n,
        }

    student = forward(PROMPT_TOKENS)  # the rollout's own prompt too
    flops = {
        "rollout": rows * sum(student.values()),
        "teacher": rows * sum(forward(TEACHER_PROMPT_TOKENS).values()),
        # forward, then the inputs' gradient through every product, and the LoRA weights' gradient
        "student": rows * (2 * student["frozen"] + 3 * student["lora"] + 3 * student["attention"]),
        "rollout_head": rows * t * head,
    }
    total = flops["rollout"] + flops["teacher"] + flops["student"]
    seconds = total / rates["matmul_flops"]

    def with_head_at(head_seconds: float) -> float:  # the FLOP floor, the rollout head priced otherwise
        return seconds + max(head_seconds - flops["rollout_head"] / rates["matmul_flops"], 0.0)

    head_bytes = vocab * HIDDEN * (4 if r["dtype"] == "float32" else 2)
    roofline = with_head_at(t * head_bytes / rates["head_read_bytes"][vocab])  # one read per decode step
    decode_bound = with_head_at(flops["rollout_head"] / rates["decode_head_flops"][vocab])
    return {
        "floor_flops": {**flops, "total": total},
        "floor_seconds": seconds,
        "roofline_floor_seconds": roofline,
        "decode_bound_floor_seconds": decode_bound,
        "time_over_floor": r["seconds_per_step"] / seconds,
        "time_over_roofline_floor": r["seconds_per_step"] / roofline,
        "time_over_decode_bound_floor": r["seconds_per_step"] / decode_bound,
    }


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    return f"{names[0] if names else platform.machine()} ({os.cpu_count()} CPUs)"


def versions() -> dict:
    """Library versions and which sdft-lite source was measured (it changes while people work)."""
    from importlib.metadata import version

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()

    source = b"".join(p.read_bytes() for p in sorted((REPO / "sdft_lite").rglob("*.py")))
    return {
        **{name: version(name) for name in ("torch", "transformers", "trl", "peft")},
        "sdft_lite_commit": git("rev-parse", "--short", "HEAD"),
        "sdft_lite_uncommitted": git("status", "--porcelain", "--", "sdft_lite").splitlines(),
        "sdft_lite_source_sha1": hashlib.sha1(source).hexdigest()[:12],
    }


# --------------------------------------------------------------------------- child: one (tool, config) run
def sdft_lite_trainer(spec: dict, work: Path):
    """sdft-lite's trainer for the run; backend hf, or unsloth for the sdft-lite-unsloth tool."""
    from sdft_lite.config import load_recipe
    from sdft_lite.runs import RunFolder
    from sdft_lite.train import build_trainer

    recipe = load_recipe(
        None,
        data={
            "model": {
                "name": spec["model"],
                "backend": OUR_TOOLS[spec["tool"]],
                "load_in_4bit": False,
                "dtype": spec["dtype"],
                "max_seq_length": 2048,
                "lora": {"r": LORA_R, "alpha": 2 * LORA_R, "dropout": 0.0},
            },
            "data": {
                "source": spec["data"],
                "chat_template": "never",
                "teacher_template": "{prompt}\n\n{demonstration}",
            },
            "teacher": {"kind": "base"},
            "loss": {
                "divergence": "forward",
                "support": spec["loss"],
                "topk": TOPK,
                "topk_source": "student",
                "add_tail": True,
                "skip_first_tokens": SKIP_TOKENS,
            },
            "generation": {
                "num_generations": GENERATIONS,
                "max_new_tokens": spec["completion"],
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": 0,
            },
            "train": {
                "max_steps": spec["warmup"] + spec["steps"],
                "batch_size": BATCH,
                "learning_rate": 1e-4,
                "lr_scheduler": "constant",
                "gradient_checkpointing": False,
                "seed": SEED,
                "logging_steps": 1,
                "sample_steps": 10**6,
                "save_steps": 10**6,
            },
            "eval": {"before": False, "after": False},
            "output": {"dir": str(work), "name": "run", "if_exists": "overwrite"},
        },
    )
    run = RunFolder(work / "run")
    run.prepare("overwrite")
    return build_trainer(recipe, run), "completion_length"


def trl_trainer(spec: dict, work: Path):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    data = Dataset.from_list(
        [{"prompt": r["prompt"], "privileged_context": r["demonstration"]} for r in rows]
    )
    args = SDFTConfig(
        output_dir=str(work),
        per_device_train_batch_size=BATCH,
        num_generations=GENERATIONS,
        max_completion_length=spec["completion"],
        max_prompt_length=512,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_steps=spec["warmup"] + spec["steps"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=SEED,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        teacher_model_kind="base",
        teacher_prompt_template="{prompt}\n\n{privileged_context}",
        distillation_mode="full_logits" if spec["loss"] == "full" else "topk_logits",
        distillation_alpha=0.0,
        distillation_topk=TOPK,
        distillation_add_tail=True,
        distillation_is_clip=None,
        num_loss_tokens_to_skip=SKIP_TOKENS,
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]))
    lora = LoraConfig(
        r=LORA_R,
        lora_alpha=2 * LORA_R,
        lora_dropout=0.0,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    trainer = SDFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora
    )
    return trainer, "completions/mean_length"


# sdft-lite's tools: name -> model.backend. The unsloth one needs CUDA and the unsloth package.
OUR_TOOLS = {"sdft-lite": "hf", "sdft-lite-unsloth": "unsloth"}
TOOLS = (*OUR_TOOLS, "trl")

# cProfile phases: (label, path fragment, function); cumulative seconds of one step.
PHASES = {
    "sdft-lite": [
        ("rollout (generate_rollouts)", "sdft_lite/rollout.py", "generate_rollouts"),
        ("teacher decoder forward", "sdft_lite/teacher.py", "hidden_states"),
        ("decoder forwards, teacher + student", "sdft_lite/models.py", "decoder_hidden_states"),
        ("loss (chunked_distillation_loss)", "sdft_lite/losses.py", "chunked_distillation_loss"),
    ],
    "trl": [
        ("rollout (_generate_transformers)", "sdft/sdft_trainer.py", "_generate_transformers"),
        ("teacher + student logits", "sdft/sdft_trainer.py", "_compute_teacher_student_logits"),
        ("loss", "sdft/sdft_trainer.py", "_compute_self_distillation_loss"),
    ],
}
COMMON_PHASES = [
    ("backward", "torch/_tensor.py", "backward"),
    ("optimizer step", "torch/optim/", "step"),
    ("training_step, total", "transformers/trainer.py", "training_step"),
]


def child(spec: dict) -> dict:
    import cProfile
    import pstats

    ours = spec["tool"] in OUR_TOOLS
    if OUR_TOOLS.get(spec["tool"]) == "unsloth":
        import unsloth  # noqa: F401  (before transformers: it patches transformers, PEFT and TRL on import)
    import torch
    from transformers import TrainerCallback

    from sdft_lite.memory import peak_rss_mib  # standard library only: TRL's run imports nothing else of ours

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    make = sdft_lite_trainer if ours else trl_trainer
    trainer, length_key = make(spec, Path(spec["work"]))
    log = {"wall": [], "cpu": [], "gen": [], "cprofile": cProfile.Profile(), "torch_profile": None}

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    # Rollout time: wrap (in this process only) the function each trainer calls to sample completions.
    if ours:
        import sdft_lite.trainer as owner  # it calls generate_rollouts by this module-level name

        name = "generate_rollouts"
    else:
        owner, name = trainer, "_generate"
    rollout = getattr(owner, name)

    def timed_rollout(*args, **kwargs):
        sync()
        start = time.perf_counter()
        out = rollout(*args, **kwargs)
        sync()
        log["gen"][-1] += time.perf_counter() - start
        return out

    setattr(owner, name, timed_rollout)
    first, second = spec["warmup"], spec["warmup"] + 1  # profiled steps: cProfile, then torch.profiler

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            step = len(log["wall"])
            if spec["profile"] and step == first:
                log["cprofile"].enable()
            if spec["profile"] and step == second:
                log["torch_profile"] = torch.profiler.profile(record_shapes=True)
                log["torch_profile"].start()
            sync()
            log["gen"].append(0.0)
            self.start = (time.perf_counter(), cpu_seconds())

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            log["wall"].append(time.perf_counter() - self.start[0])
            log["cpu"].append(cpu_seconds() - self.start[1])
            if spec["profile"] and len(log["wall"]) == first + 1:
                log["cprofile"].disable()
            if spec["profile"] and len(log["wall"]) == second + 1:
                log["torch_profile"].stop()

    trainer.add_callback(StepTimer())
    rss_before = peak_rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()

    w = spec["warmup"]
    lengths = [h[length_key] for h in trainer.state.log_history if length_key in h and h.get("step", 0) > w]
    length = statistics.mean(lengths) if lengths else None
    seconds = statistics.median(log["wall"][w:])
    result = {
        **{k: spec[k] for k in ("tool", "loss", "vocab", "completion", "warmup", "steps", "dtype")},
        "device": device_name(),
        "torch_threads": torch.get_num_threads(),
        "seconds_per_step": seconds,
        "step_seconds": [round(s, 3) for s in log["wall"][w:]],
        "cpu_seconds_per_step": statistics.median(log["cpu"][w:]),
        "generation_share": sum(log["gen"][w:]) / sum(log["wall"][w:]),
        "mean_completion_length": length,
        "tokens_per_second": BATCH * GENERATIONS * (length or 0) / seconds,
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_train_mib": rss_before,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }
    if ours:  # tokens drawn through sampling.Int8Proposal (rows, draws, fallbacks), all steps
        from sdft_lite.sampling import PROPOSAL_STATS

        result["int8_proposal"] = dict(PROPOSAL_STATS)
    if spec["profile"]:
        stats = pstats.Stats(log["cprofile"]).stats
        result["profile_phases"] = {
            label: round(
                max(v[3] for (file, _, name), v in stats.items() if name == func and part in file), 3
            )
            for label, part, func in PHASES["sdft-lite" if ours else "trl"] + COMMON_PHASES
            if any(name == func and part in file for file, _, name in stats)
        }
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        events = log["torch_profile"].key_averages(group_by_input_shape=True)  # tells the heads apart
        events = sorted(events, key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events)
        result["profile_top_ops"] = [
            {
                "op": e.key,
                "shapes": [s for s in e.input_shapes if s],
                "ms": round(getattr(e, key) / 1e3, 1),
                "calls": e.count,
                "share": round(getattr(e, key) / total, 3),
            }
            for e in events[:20]
        ]
    return result


# --------------------------------------------------------------------------- parent: run, compare, print
def run_one(spec: dict, tmp: Path, omp_wait_policy: str) -> dict:
    folder = tmp / f"model-{spec['vocab']}"
    if not folder.exists():
        build_model_folder(folder, spec["vocab"], spec["dtype"])
    tag = f"{spec['tool']}-{'profile' if spec['profile'] else spec['loss']}-{spec['vocab']}-{spec['completion']}"
    tag += f"-{len(list(tmp.glob(tag + '-*.log')))}"
    spec_file = tmp / f"{tag}.json"
    spec_file.write_text(
        json.dumps({**spec, "model": str(folder), "data": str(tmp / "train.jsonl"), "work": str(tmp / tag)})
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.update({"OMP_WAIT_POLICY": omp_wait_policy} if omp_wait_policy else {})
    load, start = os.getloadavg()[0], time.perf_counter()
    with open(tmp / f"{tag}.log", "w") as out:
        subprocess.run(
            [sys.executable, __file__, "--child", str(spec_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )
    result_file = spec_file.with_suffix(".result.json")
    if not result_file.exists():
        tail = "".join((tmp / f"{tag}.log").read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{tag} failed:\n{tail}")
    r = {**json.loads(result_file.read_text()), "load_avg_1min": [load, os.getloadavg()[0]]}
    print(
        f"  {tag:34} {r['seconds_per_step']:6.2f} s/step {r['cpu_seconds_per_step']:6.2f} CPU s/step  "
        f"load {load:.1f}  ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return r


def best_of(runs: list[dict], rates: dict) -> dict:
    """The least disturbed run (lowest median s/step); CPU time is the lowest, peak memory the highest."""
    r = dict(min(runs, key=lambda x: x["seconds_per_step"]))
    r.update(
        run_medians=[x["seconds_per_step"] for x in runs],
        cpu_seconds_per_step=min(x["cpu_seconds_per_step"] for x in runs),
        config=f"{r['loss']} V={r['vocab']} T={r['completion']}",
        gen_pct=100 * r["generation_share"],
    )
    for key in ("peak_rss_mib", "peak_cuda_mib"):
        r[key] = max(x[key] for x in runs) if r[key] is not None else None
    return {**r, **floor(r, rates)}


def add_ratios(rows: list[dict]) -> None:
    for r in rows:
        ref = next((x for x in rows if x["tool"] == "trl" and x["config"] == r["config"]), None)
        for key, ratio in (
            ("seconds_per_step", "step_ratio"),
            ("cpu_seconds_per_step", "cpu_ratio"),
            ("peak_rss_mib", "rss_ratio"),
            ("peak_cuda_mib", "cuda_ratio"),
        ):
            if r["tool"] in OUR_TOOLS and ref and r[key] is not None:
                r[ratio] = r[key] / ref[key]


def print_table(rows: list[dict], cuda: bool) -> None:
    columns = [
        ("tool", "tool", "{}"),
        ("config", "config", "{}"),
        ("s/step", "seconds_per_step", "{:.2f}"),
        ("CPU s/step", "cpu_seconds_per_step", "{:.2f}"),
        ("gen %", "gen_pct", "{:.0f}"),
        ("tok/s", "tokens_per_second", "{:.1f}"),
        ("len", "mean_completion_length", "{:.0f}"),
        ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
        ("peak CUDA MiB", "peak_cuda_mib", "{:.0f}"),
        ("FLOP floor s", "floor_seconds", "{:.2f}"),
        ("roofline floor s", "roofline_floor_seconds", "{:.2f}"),
        ("decode-bound floor s", "decode_bound_floor_seconds", "{:.2f}"),
        ("time/FLOP floor", "time_over_floor", "{:.1f}"),
        ("time/roofline", "time_over_roofline_floor", "{:.1f}"),
        ("time/decode-bound", "time_over_decode_bound_floor", "{:.1f}"),
        ("s/step vs TRL", "step_ratio", "{:.2f}"),
        ("CPU s vs TRL", "cpu_ratio", "{:.2f}"),
        ("RSS vs TRL", "rss_ratio", "{:.2f}"),
        ("CUDA mem vs TRL", "cuda_ratio", "{:.2f}"),
    ]
    columns = [c for c in columns if cuda or "CUDA" not in c[0]]
    cells = [[fmt.format(r[key]) if r.get(key) is not None else "-" for _, key, fmt in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(columns)]
    for line in [[h for h, _, _ in columns], ["-" * w for w in widths], *cells]:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))


def print_profile(p: dict) -> None:
    print(
        f"\n{p['tool']}, one profiled step (full V={p['vocab']} T={p['completion']}, {p['seconds_per_step']:.2f} s/step "
        "with the profilers on). Cumulative seconds (cProfile, first measured step):"
    )
    for label, seconds in p["profile_phases"].items():
        print(f"  {label:40} {seconds:7.2f}")
    stats = p.get("int8_proposal") or {}
    if stats.get("rows"):
        print(
            f"int8 proposal (sampling.Int8Proposal), all steps of the run: {stats['rows']} tokens, "
            f"{stats['rows'] / max(stats.get('draws', 0), 1):.1%} of draws accepted, "
            f"{stats.get('fallback_rows', 0)} from the fp32 head, "
            f"{stats.get('kernel_rows', 0)} through the C kernel (sdft_lite/csrc/cpu_kernels.c)"
        )
    elif "int8_proposal" in p:
        print("int8 proposal: not used (see sampling.int8_proposal)")
    print("Top ops by self time and input shapes (torch.profiler, second measured step):")
    for e in p["profile_top_ops"]:
        shapes = " x ".join(str(s) for s in e["shapes"][:2]).replace(" ", "")
        print(
            f"  {e['op'][:32]:32} {shapes[:34]:34} {e['ms']:8.1f} ms {100 * e['share']:5.1f} % {e['calls']:5d} calls"
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=4, help="measured optimizer steps per run (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps before measuring")
    p.add_argument("--repeats", type=int, help="runs per (tool, config), interleaved (default 2; sweep 1)")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--completion", type=int, default=128, help="tokens per completion (always reached)")
    p.add_argument(
        "--losses", default="full,topk", help="comma list: full (full vocab), topk (top-100 + tail)"
    )
    p.add_argument(
        "--tools",
        help="comma list of sdft-lite, sdft-lite-unsloth (CUDA + unsloth), trl; default sdft-lite,trl, "
        "plus sdft-lite-unsloth where CUDA and unsloth are there",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="weights and compute, both tools (default: bfloat16 on a CUDA GPU that supports it, else float32)",
    )
    p.add_argument("--sweep", action="store_true", help="full loss over --sweep-completions x --sweep-vocabs")
    p.add_argument("--sweep-completions", default="64,128,256,512")
    p.add_argument("--sweep-vocabs", default="32000,151936")
    p.add_argument(
        "--profile-tools",
        default="sdft-lite",
        help="tools to profile for one step ('' = none; not in sweeps)",
    )
    p.add_argument(
        "--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY for every run; '' leaves it unset"
    )
    p.add_argument(
        "--out", type=Path, help="default: benchmarks/results/bench_vs_trl.json (_sweep.json for --sweep)"
    )
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        a.child.with_suffix(".result.json").write_text(json.dumps(child(json.loads(a.child.read_text()))))
        return
    if a.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy  # also for this process's matmul-rate measurement
    import torch

    cuda = torch.cuda.is_available()
    a.dtype = a.dtype or ("bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32")
    unsloth = (
        importlib.util.find_spec("unsloth") is not None
    )  # looked up, not imported (it patches on import)
    tools = (
        a.tools.split(",")
        if a.tools
        else ["sdft-lite", "trl", *(["sdft-lite-unsloth"] if cuda and unsloth else [])]
    )
    profiled = [t for t in a.profile_tools.split(",") if t]
    unknown = [t for t in tools + profiled if t not in TOOLS]
    if unknown:
        p.error(f"--tools/--profile-tools: unknown {', '.join(unknown)}; choose from {', '.join(TOOLS)}")
    if "sdft-lite-unsloth" in tools + profiled and not (cuda and unsloth):
        missing = " and ".join(
            m for m, ok in (("a CUDA GPU", cuda), ("the unsloth package", unsloth)) if not ok
        )
        p.error(f"--tools sdft-lite-unsloth needs {missing}; leave it out of --tools on this machine")
    tmp = Path(tempfile.mkdtemp(prefix="bench_vs_trl-"))
    write_data(tmp / "train.jsonl")
    if a.sweep:
        configs = [
            ("full", int(v), int(c))
            for v in a.sweep_vocabs.split(",")
            for c in a.sweep_completions.split(",")
        ]
    else:
        configs = [(loss, a.vocab, a.completion) for loss in a.losses.split(",")]

    def measure_rates() -> dict:
        return matmul_rates("cuda" if cuda else "cpu", a.dtype, sorted({v for _, v, _ in configs}))

    rates = measure_rates()
    heads = ", ".join(f"V={v}: {f / 1e9:.1f}" for v, f in rates["decode_head_flops"].items())
    reads = ", ".join(f"V={v}: {b / 1e9:.1f}" for v, b in rates["head_read_bytes"].items())
    print(
        f"{device_name()}, {torch.get_num_threads()} torch threads; {a.dtype} GFLOP/s: matmul 2048^3 "
        f"{rates['matmul_flops'] / 1e9:.0f}, decode head [4,{HIDDEN}]x[{HIDDEN},V] {heads}; "
        f"head read GB/s {reads}; logs in {tmp}",
        flush=True,
    )

    repeats, runs = a.repeats or (1 if a.sweep else 2), {}
    for rep in range(repeats):  # interleaved, tool order alternating: a slow spell hits both tools alike
        for loss, vocab, completion in configs:
            for tool in tools if rep % 2 == 0 else tools[::-1]:
                spec = dict(
                    tool=tool,
                    loss=loss,
                    vocab=vocab,
                    completion=completion,
                    warmup=a.warmup,
                    steps=a.steps,
                    dtype=a.dtype,
                    profile=False,
                )
                runs.setdefault((tool, loss, vocab, completion), []).append(
                    run_one(spec, tmp, a.omp_wait_policy)
                )
    # Measured again after the runs: a slow spell of a shared machine during one measurement would
    # otherwise give a low rate, so a low floor and a flattering time/floor. Each rate is the
    # better of the two measurements (the lower floor); both are kept in the JSON.
    rates_after = measure_rates()
    rates_before, rates = rates, best_rates(rates, rates_after)
    profiles = {}
    for tool in [] if a.sweep else profiled:
        spec = dict(
            tool=tool,
            loss="full",
            vocab=a.vocab,
            completion=a.completion,
            warmup=a.warmup,
            steps=2,
            dtype=a.dtype,
            profile=True,
        )
        profiles[tool] = run_one(spec, tmp, a.omp_wait_policy)
    rows = [best_of(rs, rates) for rs in runs.values()]
    add_ratios(rows)

    print(
        f"\n{BATCH} prompts x {GENERATIONS} generation, LoRA r {LORA_R}, teacher base, {a.dtype}; {a.warmup} warm-up + "
        f"{a.steps} measured steps, best of {repeats} run(s); ratios = sdft-lite / TRL\n"
    )
    print(
        f"matmul 2048^3 GFLOP/s before / after the runs: {rates_before['matmul_flops'] / 1e9:.0f} / "
        f"{rates_after['matmul_flops'] / 1e9:.0f} (the floors use the higher)\n"
    )
    print_table(rows, cuda)
    for profile in profiles.values():
        print_profile(profile)
    loads = [x for rs in runs.values() for r in rs for x in r["load_avg_1min"]]
    meta = {
        **versions(),
        "python": platform.python_version(),
        "device": device_name(),
        "cuda": cuda,
        "command": " ".join(["python", *sys.argv]),
        "matmul": rates,
        "matmul_before": rates_before,
        "matmul_after": rates_after,
        "load_avg_1min_range": [min(loads), max(loads)],
        "omp_wait_policy": a.omp_wait_policy,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "setup": dict(
            hidden=HIDDEN,
            layers=LAYERS,
            heads=HEADS,
            kv_heads=KV_HEADS,
            intermediate=INTERMEDIATE,
            lora_r=LORA_R,
            batch=BATCH,
            generations=GENERATIONS,
            prompt_tokens=PROMPT_TOKENS,
            teacher_prompt_tokens=TEACHER_PROMPT_TOKENS,
            skip_first_tokens=SKIP_TOKENS,
            teacher="base",
            topk=TOPK,
            divergence="forward KL",
        ),
    }
    out = a.out or RESULTS / ("bench_vs_trl_sweep.json" if a.sweep else "bench_vs_trl.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows, "profiles": profiles}, indent=2) + "\n")
    for folder in tmp.glob("model-*"):  # keep the logs, drop the model copies
        shutil.rmtree(folder)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

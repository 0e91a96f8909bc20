"""Peak memory and time of the distillation loss: chunked vs naive, by vocabulary and tokens.

    python benchmarks/loss_memory.py [--hidden 256] [--budget-mb 64] [--out benchmarks/results/loss_memory.json]

CPU (or the default device if CUDA is there). Each (impl, vocab, tokens) runs forward + backward
in its own subprocess, so one run's allocator state cannot hide another's peak. On CPU the peak
is the growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs
before the measured step; ru_maxrss deltas where that is unavailable) over its resident set
before the step; on CUDA it is torch.cuda.max_memory_allocated over the allocated memory before.
The head weight and the inputs exist before the measurement starts, so the number is the loss's.

Every CPU run is done twice. With glibc's default malloc, freed blocks below its (dynamically
raised, up to 32 MiB) mmap threshold stay in the heap, so RSS also counts allocator retention
and fragmentation: the chunked loss's many same-sized [rows, V] tensors then show up as far more
RSS than is ever live. With MALLOC_MMAP_THRESHOLD_=65536 every large tensor is its own mapping,
returned on free, so the RSS peak is the peak of live tensor memory. Time is from the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

VOCABS = (32_000, 151_936)
TOKENS = (256, 1024)
IMPLS = ("chunked", "naive")
# glibc only (ignored elsewhere): a fixed threshold also turns off its dynamic adjustment.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
REPO = Path(__file__).resolve().parents[1]


def _worker(impl: str, vocab: int, tokens: int, hidden: int, budget_mb: float) -> dict:
    import torch
    from torch import nn

    from sdft_lite.losses import LossSpec, chunked_distillation_loss, naive_distillation_loss, rows_per_chunk
    from sdft_lite.memory import proc_status_kib, reset_peak_rss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = LossSpec(chunk_budget_mb=budget_mb)  # the default loss: full-vocab forward KL
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(hidden, vocab, bias=False).requires_grad_(False).to(device)  # frozen lm_head
    student = torch.randn(tokens, hidden, generator=g).to(device).requires_grad_()
    teacher = torch.randn(tokens, hidden, generator=g).to(device)
    target = torch.randint(0, vocab, (tokens,), generator=g).to(device)

    def step(n: int) -> None:
        if impl == "chunked":
            out = chunked_distillation_loss(student[:n], teacher[:n], head, head, target[:n], spec)
        else:
            out = naive_distillation_loss(head(student[:n]), head(teacher[:n]), target[:n], spec)
        out.per_token_loss.mean().backward()
        student.grad = None

    step(8)  # warm-up: kernels, thread pools, allocator arenas are not the loss's memory
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset = reset_peak_rss()
        before_kib = proc_status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    step(tokens)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
        method = "cuda.max_memory_allocated"
    else:
        after_kib = proc_status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mib = (after_kib - before_kib) / 1024
        method = "VmHWM - VmRSS" if reset else "ru_maxrss delta"
    return {
        "impl": impl,
        "vocab": vocab,
        "tokens": tokens,
        "hidden": hidden,
        "device": device,
        "budget_mb": budget_mb if impl == "chunked" else None,
        "rows_per_chunk": rows_per_chunk(vocab, spec) if impl == "chunked" else tokens,
        "one_fp32_logits_mib": tokens * vocab * 4 / 2**20,
        "peak_mib": round(peak_mib, 1),
        "seconds": round(seconds, 3),
        "method": method,
    }


def _run_in_subprocess(
    impl: str, vocab: int, tokens: int, hidden: int, budget_mb: float, extra_env: dict[str, str]
) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(vocab), str(tokens), str(hidden), str(budget_mb)]
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, **extra_env}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} V={vocab} N={tokens} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the fake lm_head")
    parser.add_argument("--budget-mb", type=float, default=64.0, help="LossSpec.chunk_budget_mb for chunked")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "loss_memory.json")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, vocab, tokens, hidden, budget = args.worker
        print(json.dumps(_worker(impl, int(vocab), int(tokens), int(hidden), float(budget))))
        return

    rows = []
    header = (
        f"{'impl':8} {'vocab':>7} {'tokens':>6} {'rows/chunk':>10} {'one [N,V] fp32':>14} "
        f"{'peak, live':>10} {'peak, glibc default':>19} {'seconds':>8}"
    )
    print(
        f"hidden {args.hidden}, chunk budget {args.budget_mb:g} MiB; memory in MiB\n{header}\n{'-' * len(header)}"
    )
    for vocab in VOCABS:
        for tokens in TOKENS:
            for impl in IMPLS:
                r = _run_in_subprocess(impl, vocab, tokens, args.hidden, args.budget_mb, {})
                if r["device"] == "cpu":
                    live = _run_in_subprocess(
                        impl, vocab, tokens, args.hidden, args.budget_mb, LIVE_MEMORY_ENV
                    )
                    r = {**r, "peak_mib_glibc_default": r.pop("peak_mib"), "peak_mib": live["peak_mib"]}
                rows.append(r)
                print(
                    f"{impl:8} {vocab:>7} {tokens:>6} {r['rows_per_chunk']:>10} {r['one_fp32_logits_mib']:>14.0f} "
                    f"{r['peak_mib']:>10.0f} {r.get('peak_mib_glibc_default', float('nan')):>19.0f} "
                    f"{r['seconds']:>8.2f}",
                    flush=True,
                )
    import torch

    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loss": "full-vocab forward KL, forward + backward, frozen nn.Linear head",
        "peak": "growth of peak memory during one step over the memory before it (see module docstring)",
        "peak_mib": "CPU: with MALLOC_MMAP_THRESHOLD_=65536, i.e. live tensor memory; CUDA: max_memory_allocated",
        "peak_mib_glibc_default": "CPU: the same with glibc's default malloc (includes allocator retention)",
        "seconds": "one forward + backward, glibc default malloc on CPU",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")


if __name__ == "__main__":
    main()

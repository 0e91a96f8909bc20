"""Does it learn, and what does it forget? base vs SFT vs SDFT on a recipe, over seeds.

    python benchmarks/learn_and_forget.py [--recipe recipes/quickstart.yaml] [--seeds 0 1 2]
        [--methods sft sdft] [--set key=value ...] [--runs-dir DIR] [--out FILE.json]

Each (method, seed) is one real `sdft-lite train` run in its own process: the same recipe, data,
steps, batch, learning rate and evaluation, with only `method.name` and `train.seed` changed
(`--set` applies further overrides to every run). "base" is the model before training: the
`before` row every run records (greedy decoding, so identical across runs). SFT is trained on
the demonstrations; SDFT distils the teacher (the same model with the demonstration in its
prompt) into the plain-prompt student on its own samples.

Printed, per method: new-task accuracy and the accuracy on each prior-skill probe after training,
as mean ± standard deviation over seeds with [min, max]; "retention" is the mean over probes;
and the wall time of one run (loading, evaluation before/after and training). The JSON has every
run's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEW = "new_task"


def run_one(recipe: Path, runs_dir: Path, method: str, seed: int, overrides: list[str]) -> dict:
    name = f"{method}-seed{seed}"
    cmd = [
        sys.executable, "-m", "sdft_lite.cli", "train", str(recipe),
        f"method.name={method}", f"train.seed={seed}",
        f"output.dir={runs_dir}", f"output.name={name}", "output.if_exists=overwrite",
        *overrides,
    ]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"{name} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    ev = json.loads((runs_dir / name / "eval.json").read_text())
    acc = {label: {k: v["accuracy"] for k, v in ev[label].items() if isinstance(v, dict)}
           for label in ("before", "after", "teacher") if label in ev}  # fmt: skip
    status = json.loads((runs_dir / name / "status.json").read_text())
    print(f"  {name}: new task {acc['after'].get(NEW, float('nan')):.2f}, wall {wall:.0f} s", flush=True)
    return {"method": method, "seed": seed, "wall_seconds": wall, "steps": status.get("step"), **acc}


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:5.1f} ± {100 * sd:4.1f} [{100 * min(values):.0f}, {100 * max(values):.0f}]"


def table(runs: list[dict], methods: list[str]) -> str:
    probes = [k for k in runs[0]["after"] if k != NEW]
    header = ["method", "new task %", *(f"{p} %" for p in probes), "retention %", "wall s/run"]
    rows = []

    def retention(acc: dict) -> float:
        return statistics.fmean(acc[p] for p in probes) if probes else float("nan")

    base = runs[0]["before"]
    rows.append(["base (before)", f"{100 * base.get(NEW, 0):5.1f}",
                 *(f"{100 * base[p]:5.1f}" for p in probes), f"{100 * retention(base):5.1f}", "-"])  # fmt: skip
    if "teacher" in runs[0]:
        teacher = runs[0]["teacher"].get(NEW)
        rows.append(["teacher (demo in prompt)", f"{100 * teacher:5.1f}", *("-" for _ in probes), "-", "-"])
    for m in methods:
        group = [r for r in runs if r["method"] == m]
        rows.append([
            f"{m} (n={len(group)})",
            spread([r["after"][NEW] for r in group]),
            *(spread([r["after"][p] for r in group]) for p in probes),
            spread([retention(r["after"]) for r in group]),
            f"{statistics.fmean(r['wall_seconds'] for r in group):.0f}",
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["sft", "sdft"], choices=["sft", "sdft"])
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="recipe overrides applied to every run")  # fmt: skip
    ap.add_argument(
        "--runs-dir", type=Path, default=None, help="where the run folders go (default: a temp folder)"
    )
    ap.add_argument("--out", type=Path, default=None, help="write every run's numbers here as JSON")
    args = ap.parse_args()

    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="learn-and-forget-"))
    recipe = args.recipe.resolve()
    print(f"recipe {recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe}; "
          f"overrides {' '.join(args.overrides) or '-'}; runs in {runs_dir}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    runs = [run_one(recipe, runs_dir, m, s, args.overrides) for m in args.methods for s in args.seeds]
    text = table(runs, args.methods)
    cpu = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"\naccuracy after training (greedy), mean ± std over seeds {args.seeds} [min, max]; "
          f"retention = mean over the prior-skill probes; {cpu}; total {time.perf_counter() - t0:.0f} s\n")  # fmt: skip
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"recipe": str(args.recipe), "overrides": args.overrides, "cpu": cpu,
                                        "table": text, "runs": runs}, indent=2) + "\n")  # fmt: skip
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

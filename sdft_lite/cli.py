"""`sdft-lite` command line. Heavy libraries are imported inside the command that needs them,
so `sdft-lite --help` and `sdft-lite validate` stay fast.

User errors (bad recipe, bad data, existing run...) print a message and exit 2, without a
traceback; unexpected errors exit 1 and the traceback goes to the run's train.log.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_USER_ERROR = 2


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_USER_ERROR


def _load(args) -> object:
    from .config import load_recipe

    overrides = list(args.overrides)
    if getattr(args, "resume", False):
        overrides.append("output.if_exists=resume")
    if getattr(args, "overwrite", False):
        overrides.append("output.if_exists=overwrite")
    if getattr(args, "name", None):
        overrides.append(f"output.name={args.name}")
    return load_recipe(args.recipe, overrides)


def cmd_validate(args) -> int:
    from .config import dump_recipe

    recipe = _load(args)
    if args.print:
        print(dump_recipe(recipe), end="")
    print(
        f"ok: {args.recipe} is a valid recipe (method {recipe.method.name}, teacher {recipe.teacher.kind}, "
        f"model {recipe.model.name})",
        file=sys.stderr,
    )
    return 0


def cmd_train(args) -> int:
    from .train import check_run_folder, run_folder_for, train

    recipe = _load(args)
    check_run_folder(recipe, run_folder_for(recipe, args.recipe))  # refusals before torch is imported
    from .backends import select_backend

    select_backend(recipe.model)  # BackendError (a user error) before the run folder is touched
    if not args.force:
        refusal = _memory_refusal(recipe)
        if refusal:
            return _err(refusal)
    run = train(recipe, args.recipe, announce=lambda run: print(f"run folder: {run.path}", file=sys.stderr))
    state = run.read_status().get("state")
    print(f"{state}: adapter saved to {run.adapter}", file=sys.stderr)
    _print_before_after(run)
    return 0


def _print_before_after(run) -> None:
    from .assess import read_eval
    from .evaluate import format_table

    ev = read_eval(run)
    labels = {"before": "before", "teacher": "teacher (demo in prompt, before)", "after": "after"}
    rows = {
        shown: {k: v for k, v in ev[label].items() if isinstance(v, dict)}
        for label, shown in labels.items()
        if label in ev
    }
    if rows:
        print(f"\naccuracy on the eval sets (greedy, {run.eval_file}):")
        print(format_table(rows))
        if "teacher" in ev and "new_task" in ev.get("before", {}):
            from .evaluate import verdict

            print(
                f"before training: {verdict(ev['before']['new_task']['accuracy'], ev['teacher']['new_task']['accuracy'])}"
            )


def cmd_eval(args) -> int:
    import json

    from .assess import standalone_eval
    from .evaluate import format_table

    recipe = _load(args)
    label, results = standalone_eval(recipe, args.target, args.runs_dir)
    print(format_table({label: results}))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({label: results}, f, indent=2)
    return 0


def cmd_check(args) -> int:
    from .assess import teacher_check

    recipe = _load(args)
    res = teacher_check(recipe, args.limit)
    print(f"on {res['n']} training rows (scorer {recipe.eval.scorer}, greedy):")
    print(f"  student (plain prompt):              {100 * res['student']:.1f}%")
    print(f"  teacher (prompt + demonstration):    {100 * res['teacher']:.1f}%")
    print(res["verdict"])
    return 0


def cmd_compare(args) -> int:
    from .assess import compare_table, resolve_run

    runs = [resolve_run(name, args.runs_dir) for name in args.runs]
    missing = [r.path for r in runs if not r.status_file.exists()]
    if missing:
        return _err(f"not a run folder (no status.json): {', '.join(map(str, missing))}")
    print(compare_table(runs))
    return 0


def _memory_refusal(recipe) -> str | None:
    """Why the run cannot fit the visible GPU (checked before any weight is loaded), or None."""
    from .plan import PlanError, check_fits_visible_gpu, plan_recipe

    try:
        return check_fits_visible_gpu(plan_recipe(recipe))
    except PlanError as e:  # no config.json to plan from: train anyway, loading will tell
        print(f"warning: no memory plan: {e}", file=sys.stderr)
        return None


def cmd_plan(args) -> int:
    from .plan import format_plan, plan_recipe

    print(format_plan(plan_recipe(_load(args), device=args.device)))
    return 0


def cmd_doctor(args) -> int:
    from .doctor import format_doctor, run_doctor

    rows = run_doctor()
    print(format_doctor(rows))
    return 1 if any(status.startswith("missing") for _, _, status in rows) else 0


def cmd_export(args) -> int:
    """Merge a run's adapter into its base model: 16-bit folder or GGUF, with Unsloth's exporter."""
    import yaml

    from .backends import activate_backend
    from .config import ModelConfig
    from .runs import RunFolder

    run = RunFolder(
        args.run
        if os.path.sep in args.run or os.path.isdir(args.run)
        else os.path.join(args.runs_dir, args.run)
    )
    if not (run.adapter / "adapter_config.json").is_file():
        return _err(f"no adapter in {run.path}: train the run first")
    model = ModelConfig.model_validate(
        {**yaml.safe_load(run.recipe.read_text(encoding="utf-8"))["model"], "backend": "unsloth"}
    )
    activate_backend(model)  # BackendError (user error) without CUDA or unsloth
    from .unsloth_backend import export_adapter

    out = export_adapter(
        run.adapter, args.out or run.path / f"export-{args.kind}", model, args.kind, args.quantization
    )
    print(f"exported {args.kind} to {out}", file=sys.stderr)
    return 0


def cmd_keys(args) -> int:
    from .config import describe_fields, markdown_table

    if args.markdown:
        print(markdown_table())
        return 0
    for key, default, help_ in describe_fields():
        if args.section and not key.startswith(args.section):
            continue
        print(f"{key} = {default}\n    {help_}")
    return 0


def cmd_stop(args) -> int:
    from .runs import RunFolder

    run = RunFolder(
        args.run
        if os.path.sep in args.run or os.path.isdir(args.run)
        else os.path.join(args.runs_dir, args.run)
    )
    if not run.status_file.exists():
        return _err(f"no run at {run.path} (expected a status.json there)")
    status = run.read_status()
    state = status.get("state")
    if state == "interrupted":
        return _err(
            f"run {run.name} is not running: its process (pid {status.get('pid')}) is gone. "
            f"Resume it with: sdft-lite train {run.recipe} --resume"
        )
    if state not in ("queued", "running"):
        return _err(f"run {run.name} is not running (state: {state})")
    run.request_stop()
    print(f"stop requested: {run.name} will save and stop after its current step", file=sys.stderr)
    return 0


def cmd_runs(args) -> int:
    from .runs import list_runs

    runs = list_runs(args.runs_dir)
    if not runs:
        print(f"no runs in {args.runs_dir}")
        return 0
    print(f"{'name':30} {'state':11} {'step':>11}  {'started':24}  note")
    for run in runs:
        s = run.read_status()
        step = f"{s.get('step', 0)}/{s.get('total_steps') or '?'}"
        print(f"{run.name:30} {s.get('state', '?'):11} {step:>11}  {s.get('started_at', ''):24}  {_note(s)}")
    return 0


def _note(status: dict) -> str:
    """Why a run ended (first line of its error) and any skipped non-finite steps."""
    parts = []
    if status.get("skipped_steps"):
        parts.append(f"{status['skipped_steps']} non-finite step(s) skipped")
    if status.get("state") in ("failed", "stopped", "interrupted") and status.get("error"):
        first = str(status["error"]).splitlines()[0]
        parts.append(first if len(first) <= 80 else first[:77] + "...")
    return "; ".join(parts)


def cmd_ui(args) -> int:
    from app.__main__ import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdft-lite",
        description="Self-Distillation Fine-Tuning: a LoRA student learns from itself shown a demonstration.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def recipe_args(sp):
        sp.add_argument("recipe", help="recipe YAML file")
        sp.add_argument(
            "overrides",
            nargs="*",
            metavar="key.sub=value",
            help="override recipe keys, e.g. train.max_steps=10 teacher.kind=base",
        )

    sp = sub.add_parser("train", help="train per a recipe; writes runs/<name>/")
    recipe_args(sp)
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an existing run from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    sp.add_argument("--name", help="run name (same as output.name=...)")
    sp.add_argument(
        "--force",
        action="store_true",
        help="start even when the memory plan says the run does not fit the visible GPU",
    )
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("plan", help="estimate a recipe's peak GPU memory and whether it fits 8/12/16/24 GB")
    recipe_args(sp)
    sp.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="plan for a GPU (default, on any machine) or for CPU training",
    )
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser(
        "doctor", help="check Python, torch/CUDA/GPU, packages, bitsandbytes 4-bit and the backend"
    )
    sp.set_defaults(func=cmd_doctor)

    sp = sub.add_parser(
        "export", help="merge a run's adapter into the base model: 16-bit or GGUF (needs unsloth)"
    )
    sp.add_argument("run", help="run name (under --runs-dir) or run folder path")
    sp.add_argument("--runs-dir", default="runs")
    sp.add_argument("--kind", choices=("merged_16bit", "gguf"), default="merged_16bit")
    sp.add_argument(
        "--quantization", default="q4_k_m", help="GGUF quantization (llama.cpp names): q4_k_m, q8_0, f16..."
    )
    sp.add_argument("--out", help="output folder (default: <run>/export-<kind>)")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("validate", help="check a recipe and report every problem at once")
    recipe_args(sp)
    sp.add_argument("--print", action="store_true", help="print the resolved recipe with all defaults")
    sp.set_defaults(func=cmd_validate)

    sp = sub.add_parser(
        "eval", help="evaluate a run's adapter (or a model) on a recipe's eval sets and probes"
    )
    sp.add_argument("target", help="run name or folder (uses its adapter), or a model name/folder")
    recipe_args(sp)
    sp.add_argument("--runs-dir", default="runs")
    sp.add_argument("--json", help="also write the results to this JSON file")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("check", help="before training: does the demonstration in context help this model?")
    recipe_args(sp)
    sp.add_argument("--limit", type=int, default=64, help="training rows to check")
    sp.set_defaults(func=cmd_check)

    sp = sub.add_parser("compare", help="table of runs: new-task accuracy, retention per probe, time, memory")
    sp.add_argument("runs", nargs="+", help="run names (under --runs-dir) or folders")
    sp.add_argument("--runs-dir", default="runs")
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("keys", help="list every recipe key with its default and help")
    sp.add_argument("section", nargs="?", help="only keys starting with this, e.g. loss")
    sp.add_argument("--markdown", action="store_true", help="print a Markdown table (the README's)")
    sp.set_defaults(func=cmd_keys)

    sp = sub.add_parser("stop", help="ask a running training to save and stop after its current step")
    sp.add_argument("run", help="run name (under --runs-dir) or run folder path")
    sp.add_argument("--runs-dir", default="runs")
    sp.set_defaults(func=cmd_stop)

    sp = sub.add_parser("runs", help="list runs and their state")
    sp.add_argument("--runs-dir", default="runs")
    sp.set_defaults(func=cmd_runs)

    from app.__main__ import add_arguments  # argparse only: gradio is imported when the app starts

    sp = sub.add_parser(
        "ui", help="open the app: launch, watch, stop, resume, compare and try runs in a browser"
    )
    add_arguments(sp)
    sp.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`train r.yaml --name x a.b=1`): argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from .errors import is_user_error

        if is_user_error(e):
            return _err(str(e))
        raise


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation wired into runs: before/after/every-N-steps results in eval.json and
metrics.jsonl, stand-alone evaluation of a run or a model, and run comparison tables."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from .runs import RunFolder, append_jsonl, atomic_write_json, read_jsonl

log = logging.getLogger(__name__)


class Evaluator:
    """Everything needed to evaluate the model being trained on the recipe's eval sets."""

    def __init__(self, model, tokenizer, encoder, sets, eos_ids, pad_id, cfg, run: RunFolder | None = None):
        self.model, self.tokenizer, self.encoder, self.sets = model, tokenizer, encoder, sets
        self.eos_ids, self.pad_id, self.cfg, self.run = eos_ids, pad_id, cfg, run

    def __call__(self, label: str, step: int, base: bool = False, as_teacher: bool = False) -> dict:
        """Evaluate (the base model when `base`, i.e. adapter off) and record the result.

        `as_teacher`: generate from the teacher prompt (question + demonstration); only the sets
        that have demonstrations (the new task) are scored.
        """
        if not self.sets:
            return {}
        ctx = (
            self.model.disable_adapter()
            if base and hasattr(self.model, "disable_adapter")
            else contextlib.nullcontext()
        )
        from .evaluate import evaluate

        with ctx:
            results = evaluate(
                self.model,
                self.tokenizer,
                self.encoder,
                self.sets,
                eos_ids=self.eos_ids,
                pad_id=self.pad_id,
                cfg=self.cfg,
                as_teacher=as_teacher,
            )
        if not results:
            return {}
        if self.run is not None:
            record_eval(self.run, label, step, results)
        return results


def record_eval(run: RunFolder, label: str, step: int, results: dict) -> None:
    data = read_eval(run)
    entry = {"step": step, **results}
    if label == "step":
        data.setdefault("steps", []).append(entry)
    else:
        data[label] = entry
    atomic_write_json(run.eval_file, data)
    append_jsonl(
        run.metrics,
        {"step": step, "eval_label": label, **{f"eval/{name}": r["accuracy"] for name, r in results.items()}},
    )


def read_eval(run: RunFolder) -> dict:
    try:
        return json.loads(run.eval_file.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def accuracies(results: dict) -> dict[str, float]:
    return {name: r["accuracy"] for name, r in results.items() if isinstance(r, dict) and "accuracy" in r}


# --------------------------------------------------------------------------- compare


def run_summary(run: RunFolder) -> dict:
    """One row of a comparison: method, teacher, accuracies before/after, wall time, peak memory."""
    import yaml

    status = run.read_status()
    recipe = yaml.safe_load(run.recipe.read_text()) if run.recipe.exists() else {}
    ev = read_eval(run)
    peaks = [m["peak_memory_mb"] for m in read_jsonl(run.metrics) if "peak_memory_mb" in m]
    method = recipe.get("method", {}).get("name", "?")
    return {
        "run": run.name,
        "state": status.get("state", "?"),
        "method": method,
        "teacher": recipe.get("teacher", {}).get("kind", "-") if method == "sdft" else "-",
        "steps": status.get("step"),
        "wall_seconds": status.get("wall_seconds"),
        "peak_memory_mb": max(peaks) if peaks else None,
        "before": accuracies(ev.get("before", {})),
        "after": accuracies(ev.get("after", {})),
    }


def compare_table(runs: list[RunFolder]) -> str:
    rows = [run_summary(r) for r in runs]
    sets = list(dict.fromkeys(name for row in rows for name in [*row["before"], *row["after"]]))
    header = ["run", "method", "teacher", "state", "steps", *sets, "wall s", "peak MB"]

    def cell(row, name):
        after, before = row["after"].get(name), row["before"].get(name)
        if after is None:
            return "-" if before is None else f"{100 * before:.1f} (before)"
        delta = f" ({100 * (after - before):+.1f})" if before is not None else ""
        return f"{100 * after:.1f}{delta}"

    body = [
        [
            r["run"],
            r["method"],
            r["teacher"],
            r["state"],
            str(r["steps"] or "-"),
            *(cell(r, s) for s in sets),
            f"{r['wall_seconds']:.0f}" if r["wall_seconds"] else "-",
            f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] else "-",
        ]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    note = "accuracy % after training (change vs before); new_task = new skill, other columns = prior-skill retention"
    return "\n".join(lines + ["", note])


def resolve_run(name: str, runs_dir: str | Path = "runs") -> RunFolder:
    p = Path(name)
    return RunFolder(p if p.is_dir() else Path(runs_dir) / name)


# --------------------------------------------------------------------------- stand-alone


def load_for_eval(recipe, target: str | None, runs_dir: str | Path = "runs"):
    """(model, tokenizer, eos_ids, pad_id, label): `target` is a run (its adapter on the recipe's
    model), a model name/folder, or None for the recipe's model itself."""
    from .models import (
        eos_token_ids,
        load_base_model,
        load_tokenizer,
        pick_device,
        pick_dtype,
        resolve_model_name,
    )

    run = resolve_run(target, runs_dir) if target else None
    is_run = run is not None and run.adapter.is_dir()
    if target and not is_run:
        _check_eval_target(target, run, runs_dir)
    name = resolve_model_name(recipe.model.name if (is_run or not target) else target)
    device = pick_device()
    dtype = pick_dtype(recipe.model.dtype, device)
    tokenizer = load_tokenizer(name, recipe.model)
    model = load_base_model(name, recipe.model, device, dtype)
    if is_run:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run.adapter))
    model.eval()
    label = run.name if is_run else Path(name).name
    return model, tokenizer, eos_token_ids(tokenizer, model), tokenizer.pad_token_id, label


def _check_eval_target(target: str, run: RunFolder, runs_dir: str | Path) -> None:
    """A target that is neither a trained run nor a model folder must look like a Hub id
    (owner/name, or a bare id already in the local cache): a mistyped run name is reported as
    such, not looked up on the Hub."""
    from .config import DEMO_MODEL
    from .train import TrainError

    if run.status_file.exists():
        raise TrainError(f"run {run.name} has no adapter/ yet (state: {run.read_status().get('state')})")
    if target == DEMO_MODEL or Path(target).expanduser().is_dir() or target.count("/") == 1:
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(target, "config.json"), str):
        return  # a downloaded Hub model without an owner in its id (e.g. gpt2)
    from .runs import list_runs

    names = sorted(r.name for r in list_runs(runs_dir))
    raise TrainError(
        f"no run named '{target}' in {runs_dir}"
        + (f" (runs there: {', '.join(names[:10])})" if names else "")
        + ", and it is not a model folder: give a run name (with --runs-dir), a run or model folder, "
        "or a Hub id like Qwen/Qwen2.5-0.5B-Instruct"
    )


def standalone_eval(recipe, target: str | None, runs_dir: str | Path = "runs") -> tuple[str, dict]:
    from .data import load_data
    from .evaluate import eval_sets_from_recipe
    from .prompts import PromptEncoder

    data = load_data(recipe.data)
    sets = eval_sets_from_recipe(recipe, data.eval)
    if not sets:
        from .train import TrainError

        raise TrainError(
            "nothing to evaluate: set data.eval_source or data.eval_fraction, or add eval.probes"
        )
    model, tok, eos_ids, pad_id, label = load_for_eval(recipe, target, runs_dir)
    evaluator = Evaluator(model, tok, PromptEncoder(tok, recipe.data), sets, eos_ids, pad_id, recipe.eval)
    return label, evaluator(label, 0)


def teacher_check(recipe, limit: int = 64) -> dict:
    """Before training: does the demonstration in context make the model better? (SDFT needs it.)"""
    from .data import load_data
    from .evaluate import teacher_student_check
    from .prompts import PromptEncoder

    data = load_data(recipe.data)
    model, tok, eos_ids, pad_id, _ = load_for_eval(recipe, None)
    return teacher_student_check(
        model,
        tok,
        PromptEncoder(tok, recipe.data),
        data.train,
        eos_ids=eos_ids,
        pad_id=pad_id,
        cfg=recipe.eval,
        limit=limit,
    )

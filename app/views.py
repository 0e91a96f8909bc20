"""What the app shows, read from run folders only: a page refresh or an app restart loses nothing.

Every function here takes a run folder (or the runs directory) and returns plain data (pandas
frames, strings, HTML) for one component. Nothing here writes.
"""

from __future__ import annotations

import html
import re
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import yaml

from sdft_lite.runs import RunFolder, list_runs, read_jsonl

RUN_COLUMNS = ["name", "state", "progress", "model", "method", "started", "duration"]
# Curves drawn from metrics.jsonl: (plot title, key).
CURVES = [
    ("loss", "loss"),
    ("KL (per token)", "kl"),
    ("completion length (tokens)", "completion_length"),
    ("tokens / s (rollout + update)", "tokens_per_s"),
]
COMPARE_METRICS = [
    "loss",
    "kl",
    "completion_length",
    "tokens_per_s",
    "grad_norm",
    "lr",
    "teacher_minus_student_logprob",
    "seconds_per_step",
]
SAMPLE_COLUMNS = ["step", "prompt", "completion", "demonstration"]
LOG_LINES = 40
SAMPLES_SHOWN = 6
CONSOLE_LOG = "console.log"  # stdout/stderr of a process the app started (errors before train.log exists)


# --------------------------------------------------------------------------- small readers


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def human_seconds(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def read_recipe(run: RunFolder) -> dict:
    try:
        data = yaml.safe_load(run.recipe.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def duration(status: dict) -> float | None:
    if status.get("wall_seconds") is not None:
        return float(status["wall_seconds"])
    start = parse_time(status.get("started_at"))
    if start is None or status.get("state") == "queued":
        return None
    end = time.time() if status.get("state") == "running" else parse_time(status.get("updated_at"))
    return None if end is None else end - start


def train_metrics(run: RunFolder) -> list[dict]:
    """metrics.jsonl lines of training steps (evaluation lines carry `eval/...` keys instead)."""
    return [m for m in read_jsonl(run.metrics) if "loss" in m]


def seconds_per_step(metrics: list[dict]) -> float | None:
    recent = [m["seconds_per_step"] for m in metrics[-5:] if m.get("seconds_per_step")]
    return sum(recent) / len(recent) if recent else None


def progress(status: dict) -> tuple[int, int | None]:
    total = status.get("total_steps")
    return int(status.get("step") or 0), int(total) if total and total > 0 else None


# --------------------------------------------------------------------------- runs table


def short_model(name: str | None) -> str:
    if not name:
        return "?"
    p = Path(name)
    return p.name if p.is_absolute() else name


def run_row(run: RunFolder, queue_position: int | None = None) -> dict:
    status, recipe = run.read_status(), read_recipe(run)
    step, total = progress(status)
    state = status.get("state", "?")
    if _starting(status):
        prog = "starting"
    elif state == "queued":
        prog = f"queued #{queue_position}" if queue_position else "queued"
    else:
        prog = f"{step}/{total} ({100 * step // total}%)" if total else f"{step}/?"
    method = recipe.get("method", {}).get("name", "?")
    if method == "sdft":
        method += f" ({recipe.get('teacher', {}).get('kind', '?')} teacher)"
    started = status.get("started_at", "") if state != "queued" else ""
    return {
        "name": run.name,
        "state": state,
        "progress": prog,
        "model": short_model(recipe.get("model", {}).get("name")),
        "method": method,
        "started": started.replace("T", " ")[:19],
        "duration": human_seconds(duration(status)),
    }


def _starting(status: dict) -> bool:
    return status.get("state") == "queued" and status.get("stage") == "starting"


def queued_order(runs: list[RunFolder]) -> list[RunFolder]:
    """Queued runs, oldest submission first: the order the queue starts them in."""
    queued = [r for r in runs if r.read_status().get("state") == "queued" and not _starting(r.read_status())]
    return sorted(queued, key=lambda r: (r.read_status().get("queued_time") or 0.0, r.name))


def created(status: dict) -> float:
    """When a run was made: the app's submission time, else (a CLI run) its start. Neither changes
    later (a resume re-queues but keeps both), so an order by it stays put while runs progress."""
    made = status.get("created_time") or parse_time(status.get("started_at")) or status.get("queued_time")
    return made or 0.0


def ordered_runs(runs_dir: str | Path) -> list[RunFolder]:
    """Runs newest first, by `created`, in an order that does not move as runs start and end."""
    runs = [(r, r.read_status()) for r in list_runs(runs_dir)]
    runs.sort(key=lambda rs: rs[0].name)
    runs.sort(key=lambda rs: created(rs[1]), reverse=True)
    return [r for r, _ in runs]


def runs_table(runs_dir: str | Path) -> pd.DataFrame:
    runs = ordered_runs(runs_dir)
    order = {r.name: i + 1 for i, r in enumerate(queued_order(runs))}
    return pd.DataFrame([run_row(r, order.get(r.name)) for r in runs], columns=RUN_COLUMNS)


# --------------------------------------------------------------------------- one run


def progress_html(run: RunFolder) -> str:
    status = run.read_status()
    if not status:
        return "<div class='sdft-progress-text'>no run selected</div>"
    step, total = progress(status)
    state = status.get("state", "?")
    frac = min(1.0, step / total) if total else 0.0
    if state == "completed":
        frac = 1.0
    parts = [f"<b>{html.escape(run.name)}</b>: {html.escape(state)}"]
    if status.get("stage") and state == "running":
        parts.append(html.escape(str(status["stage"])))
    parts.append(f"step {step}/{total or '?'}")
    sps = seconds_per_step(train_metrics(run))
    if state == "running" and total and sps:
        parts.append(f"ETA {human_seconds((total - step) * sps)} ({sps:.1f} s/step)")
    parts.append(f"elapsed {human_seconds(duration(status))}")
    color = {"failed": "#d9534f", "stopped": "#f0ad4e", "completed": "#5cb85c"}.get(state, "#337ab7")
    return (
        f"<div class='sdft-progress' data-state='{html.escape(state)}'>"
        f"<div style='background:#e9ecef;border-radius:6px;height:18px;overflow:hidden'>"
        f"<div style='width:{100 * frac:.1f}%;background:{color};height:100%'></div></div>"
        f"<div class='sdft-progress-text'>{' · '.join(parts)}</div></div>"
    )


def curve(rows: list[tuple[int, float, str]]) -> pd.DataFrame:
    """A plot frame with fixed dtypes: the browser keeps an axis type from the first value it got, so
    even an empty frame must say that step and value are numbers."""
    step, value, series = zip(*rows, strict=True) if rows else ((), (), ())
    return pd.DataFrame(
        {
            "step": pd.Series(step, dtype="int64"),
            "value": pd.Series(value, dtype="float64"),
            "series": pd.Series(series, dtype="str"),
        }
    )


def curve_frame(metrics: list[dict], key: str, label: str = "") -> pd.DataFrame:
    return curve(
        [
            (int(m["step"]), float(m[key]), label or key)
            for m in metrics
            if isinstance(m.get(key), int | float) and "step" in m
        ]
    )


def eval_frame(run: RunFolder) -> pd.DataFrame:
    """Accuracy per eval set over steps: `new_task` is the new skill, the others are retention probes."""
    rows = []
    for m in read_jsonl(run.metrics):
        # The teacher row (demonstration in the prompt, before training) is its own series: the level
        # the student can reach by distillation.
        suffix = " (teacher)" if m.get("eval_label") == "teacher" else ""
        for k, v in m.items():
            if k.startswith("eval/") and isinstance(v, int | float):
                rows.append((int(m.get("step", 0)), float(v), k.removeprefix("eval/") + suffix))
    return curve(rows)


def samples_frame(run: RunFolder, n: int = SAMPLES_SHOWN) -> pd.DataFrame:
    samples = read_jsonl(run.samples)[-n:][::-1]  # newest first
    return pd.DataFrame([{c: s.get(c, "") for c in SAMPLE_COLUMNS} for s in samples], columns=SAMPLE_COLUMNS)


def tail(path: Path, n: int = LOG_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    # Progress bars rewrite their line with \r: keep what a terminal would show.
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join([line for line in lines if line.strip()][-n:])


def log_tail(run: RunFolder, n: int = LOG_LINES) -> str:
    """The end of train.log, and of the process's console output when it says more (errors before
    train.log exists, e.g. a recipe the CLI rejected)."""
    log = tail(run.log_file, n)
    console = tail(run.path / CONSOLE_LOG, n)
    if console and (not log or run.read_status().get("state") == "failed"):
        return (log + "\n\n" if log else "") + f"--- {CONSOLE_LOG} ---\n" + console
    return log


# status.json's hint is written by the CLI, for the command line; the app shows its own actions.
APP_HINTS = [
    (r"\(?add --overwrite to reuse the run name\)?", "(or Delete this run to reuse its name)"),
    (r"then run again", "then start it again from the New run tab"),
    (r"\s*(?:with)?:?\s*`?sdft-lite train [^\s`]+ --resume`?", " with the Resume button"),
    (r"`?sdft-lite stop [^\s`]+(?: --runs-dir [^\s`]+)?`?", "Stop and save"),
    (r"see train\.log in the run folder", "see the log tail below"),
    (r"--overwrite", "Delete (then start again)"),
    (r"--resume", "Resume"),
]


def app_hint(hint: str) -> str:
    for pattern, action in APP_HINTS:
        hint = re.sub(pattern, action, hint)
    return hint


def error_markdown(run: RunFolder) -> str:
    status = run.read_status()
    if not status.get("error"):
        return ""
    hint = f"\n\n**What to do:** {app_hint(status['hint'])}" if status.get("hint") else ""
    return f"**{status.get('state', 'error')}:** {status['error']}{hint}"


def eval_note(run: RunFolder, evals: pd.DataFrame) -> str:
    """Says why there is no accuracy curve: the run has no eval set, or has not evaluated yet."""
    if not evals.empty:
        return ""
    recipe = read_recipe(run)
    data, ev = recipe.get("data") or {}, recipe.get("eval") or {}
    if not (data.get("eval_source") or (data.get("eval_fraction") or 0) > 0 or ev.get("probes")):
        return (
            "**No eval set:** this run measures no accuracy. To see the new skill and retention, set "
            "data.eval_source or data.eval_fraction, and eval.probes (extra keys in the New run tab)."
        )
    return "**Accuracy:** no evaluation recorded yet."


def adapter_description(run: RunFolder) -> str:
    """Which adapter Try and Export use: the run's final adapter/ (a checkpoint is not an adapter)."""
    status = run.read_status()
    state, step = status.get("state"), status.get("step")
    when = {"completed": "when the run completed", "stopped": "when the run was stopped"}.get(
        state, "at the run's last stop"
    )
    return f"the final adapter (`{run.name}/adapter`, saved {when}, step {step})"


def is_run_name(name: str | None) -> bool:
    """A plain folder name (what the page sends), never a path that leaves the runs folder."""
    return bool(name) and Path(name).name == name and name not in (".", "..")


def run_choices(runs_dir: str | Path, with_adapter: bool = False) -> list[str]:
    return [
        r.name
        for r in ordered_runs(runs_dir)
        if not with_adapter or (r.adapter / "adapter_config.json").exists()
    ]


# --------------------------------------------------------------------------- compare


def compare_frame(runs: list[RunFolder], key: str) -> pd.DataFrame:
    frames = [curve_frame(train_metrics(r), key, r.name) for r in runs]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else curve([])

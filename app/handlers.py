"""Event handlers: what each button does. They return inline messages, never raise at the user.

Every handler takes and returns plain values (strings, frames, gr.update), so the same functions
serve the browser and `gradio_client`.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import shutil
from pathlib import Path

import gradio as gr
import pandas as pd

from sdft_lite.runs import RunFolder

from . import form as F
from . import views as V
from .jobs import JobError, Jobs, shell_command

log = logging.getLogger(__name__)


def _failed(e: Exception) -> str:
    log.exception("handler failed")
    return f"**Error:** {type(e).__name__}: {e}"


def form_handler(fn):
    """`fn(base=None, **form values)` with an explicit keyword signature, so API clients see every form
    field as an optional parameter (an omitted one takes the field's default)."""

    def call(**kwargs):
        return fn(**kwargs)

    names = ("base", *F.FORM_PARAMS)
    call.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]
    )
    call.__name__, call.__doc__ = fn.__name__, fn.__doc__
    return call


def _plot_update(frame: pd.DataFrame, run_name: str) -> dict:
    """A plot's new value and a caption with its latest point. The browser redraws a plot's layout
    (axis label widths) only when a property such as the caption changes, not for new data alone,
    so the caption changing with each new point also keeps the axes from being clipped."""
    if frame.empty:
        return gr.update(value=None, caption=f"{run_name}: no points yet")
    last = frame.iloc[-1]
    latest = ", ".join(f"{r.series} {r.value:.4g}" for r in frame[frame.step == last.step].itertuples())
    return gr.update(value=frame, caption=f"{run_name} at step {last.step}: {latest}")


class Handlers:
    def __init__(self, jobs: Jobs):
        self.jobs = jobs
        self.runs_dir = jobs.runs_dir

    def run(self, name: str | None) -> RunFolder | None:
        """The run folder of a name the page sent: a plain folder name, never a path."""
        if not V.is_run_name(name):
            return None
        run = RunFolder(self.runs_dir / name)
        return run if run.status_file.exists() else None

    # ------------------------------------------------------------------ New run: model and data
    @staticmethod
    def demo_data() -> str | None:
        try:
            from sdft_lite.demo import demo_data_dir

            path = demo_data_dir() / "train.jsonl"
        except Exception:  # the demo is optional: no data, no default
            return None
        return str(path) if path.is_file() else None

    def model_kind_changed(self, kind: str, name: str, source: str):
        if kind == F.MODEL_KINDS[0]:
            return gr.update(value=F.DEMO_MODEL, interactive=False), source or self.demo_data() or ""
        return gr.update(value="" if name == F.DEMO_MODEL else name, interactive=True), source

    def upload_data(self, path: str | None) -> str:
        """Keep an uploaded data file under <runs_dir>/.uploads (gradio's temp copy may be cleaned up)."""
        if not path:
            return gr.update()
        src = Path(path)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:8]
        dest = self.runs_dir / ".uploads" / f"{digest}-{src.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            shutil.copyfile(src, dest)
        return str(dest)

    def preview(self, source: str, split: str, prompt_col: str, demo_col: str, answer_col: str):
        frame, columns, msg = F.preview_data(source, split)
        if not columns:
            return frame, gr.update(), gr.update(), gr.update(), msg
        pick = {
            key: F.guess_column(columns, key, cur)
            for key, cur in (
                ("data.prompt_column", prompt_col),
                ("data.demonstration_column", demo_col),
                ("data.answer_column", answer_col),
            )
        }
        return (
            frame,
            gr.update(choices=columns, value=pick["data.prompt_column"] or columns[0]),
            gr.update(choices=columns, value=pick["data.demonstration_column"] or columns[-1]),
            gr.update(choices=[F.NO_COLUMN, *columns], value=pick["data.answer_column"] or F.NO_COLUMN),
            msg,
        )

    def render_prompts(self, base: dict | None = None, **values):
        recipe, problems = F.build_recipe(values, base, self.runs_dir)
        if recipe is None:
            return "", "", F.problems_markdown(problems, "Fix these first")
        try:
            return F.render_prompts(recipe)
        except Exception as e:
            return "", "", _failed(e)

    # ------------------------------------------------------------------ New run: check and start
    def check(self, base: dict | None = None, **values):
        """(message, recipe YAML, command, memory plan) for the form; problems name their recipe key."""
        try:
            recipe, problems = F.build_recipe(values, base, self.runs_dir)
            if recipe is None:
                return F.problems_markdown(problems), "", "", ""
            problems = F.data_problems(recipe)
            run = RunFolder(self.runs_dir / recipe.output.name)
            if run.path.exists() and any(run.path.iterdir()):
                problems.append(f"output.name: a run named '{run.name}' already exists: pick another name")
            yaml_text, cmd, plan = F.recipe_yaml(recipe), shell_command(run), F.plan_text(recipe)
            if problems:
                return F.problems_markdown(problems), yaml_text, cmd, plan
            return f"Recipe OK: run **{run.name}** would train in `{run.path}`.", yaml_text, cmd, plan
        except Exception as e:
            return _failed(e), "", "", ""

    def start(self, base: dict | None = None, **values):
        """Check, then queue the run (it starts at once when no other training is running)."""
        message, yaml_text, cmd, plan = self.check(base, **values)
        if not message.startswith("Recipe OK"):
            return message, yaml_text, cmd, plan
        recipe, _ = F.build_recipe(values, base, self.runs_dir)
        try:
            run = self.jobs.submit(yaml_text, recipe.output.name)
        except JobError as e:
            return F.problems_markdown([str(e)]), yaml_text, cmd, plan
        self.jobs.tick()  # start it now if nothing else is running
        state = run.read_status().get("state")
        where = "started" if state == "running" else "queued: it starts when the running training ends"
        return f"Run **{run.name}** {where}. Follow it in the Runs tab.", yaml_text, cmd, plan

    def load_recipe(self, path: str | None):
        """Fill the form from a recipe YAML (file upload or path); returns every form value + base + message."""
        outputs = F.SPECIAL + [F.param(k) for k in F.GENERIC_KEYS]
        if not path:
            return [gr.update() for _ in outputs] + [gr.update(), "Give a recipe file first."]
        raw, note = F.read_recipe_file(path)
        if raw is None:
            return [gr.update() for _ in outputs] + [gr.update(), note]
        values = F.form_values(raw, path)
        updates = [values[p] for p in outputs]
        updates[1] = gr.update(
            value=values["model_name"], interactive=values["model_kind"] != F.MODEL_KINDS[0]
        )
        for i, p in enumerate(outputs):  # column dropdowns: allow the loaded names before any preview
            if p in ("data__prompt_column", "data__demonstration_column", "data__answer_column"):
                updates[i] = gr.update(
                    choices=sorted({values[p], F.NO_COLUMN} if p.endswith("answer_column") else {values[p]}),
                    value=values[p],
                )
        return updates + [raw, note]

    # ------------------------------------------------------------------ Runs
    def runs_table(self) -> pd.DataFrame:
        return V.runs_table(self.runs_dir)

    def run_names(self) -> list[str]:
        return V.run_choices(self.runs_dir)

    def adapter_names(self) -> list[str]:
        return V.run_choices(self.runs_dir, with_adapter=True)

    def run_choices(self):
        return gr.update(choices=self.run_names())

    def run_choices_multi(self, current: list[str] | None):
        names = self.run_names()
        return gr.update(choices=names, value=[n for n in current or [] if n in names])

    def adapter_choices(self, current: str | None):
        names = self.adapter_names()
        return gr.update(choices=names, value=current if current in names else (names[0] if names else None))

    @staticmethod
    def select_row(evt: gr.SelectData):
        row = evt.row_value or []
        return row[0] if row else gr.update()

    def run_view(self, name: str | None):
        """progress, error, 4 curves, eval curve, samples, log tail, status.json of one run."""
        run = self.run(name)
        if run is None:
            return (
                V.progress_html(RunFolder(self.runs_dir / "-")),
                "",
                *[gr.update(value=None, caption=None)] * len(V.CURVES),
                gr.update(value=None, visible=False),
                pd.DataFrame(columns=V.SAMPLE_COLUMNS),
                "",
                {},
            )
        metrics = V.train_metrics(run)
        curves = [_plot_update(V.curve_frame(metrics, key), run.name) for _, key in V.CURVES]
        evals = V.eval_frame(run)  # shown only for runs that evaluate
        return (
            V.progress_html(run),
            V.error_markdown(run),
            *curves,
            gr.update(**_plot_update(evals, run.name), visible=not evals.empty),
            V.samples_frame(run),
            V.log_tail(run),
            run.read_status(),
        )

    def refresh(self, name: str | None):
        return (self.runs_table(), *self.run_view(name))

    def stop(self, name: str) -> str:
        try:
            return self.jobs.stop(name)
        except JobError as e:
            return f"**Cannot stop:** {e}"

    def cancel(self, name: str) -> str:
        try:
            return self.jobs.cancel(name)
        except JobError as e:
            return f"**Cannot cancel:** {e}"

    def resume(self, name: str) -> str:
        try:
            run = self.jobs.resume(name)
        except JobError as e:
            return f"**Cannot resume:** {e}"
        self.jobs.tick()
        ckpt = run.last_checkpoint()
        return f"{name} queued to resume from {ckpt.name if ckpt else 'step 0 (no checkpoint)'}"

    # ------------------------------------------------------------------ Compare, Try, Export
    def compare(self, names: list[str] | None, metric: str):
        runs = [r for r in (self.run(n) for n in names or []) if r is not None]
        if len(runs) < 2:
            return V.curve([]), "Pick two or more runs."
        from sdft_lite.assess import compare_table

        try:
            table = compare_table(runs)
        except Exception as e:
            table = _failed(e)
        frame = V.compare_frame(runs, metric or "loss")
        caption = f"{metric or 'loss'}: {', '.join(r.name for r in runs)}"  # a new caption redraws the plot
        return gr.update(value=frame, caption=caption), f"```\n{table}\n```"

    def try_prompt(self, name: str, prompt: str, max_new_tokens: float):
        from .tryout import TryError, generate_pair

        run = self.run(name)
        if run is None:
            return "", "", "Pick a run with a saved adapter."
        try:
            base, tuned = generate_pair(run, prompt or "", int(max_new_tokens))
        except TryError as e:
            return "", "", f"**Cannot try:** {e}"
        except Exception as e:
            return "", "", _failed(e)
        return base, tuned, ""

    def export_adapter(self, name: str):
        from .tryout import TryError, adapter_zip

        run = self.run(name)
        if run is None:
            return None, "Pick a run with a saved adapter."
        try:
            path = adapter_zip(run)
        except TryError as e:
            return None, f"**Cannot export:** {e}"
        return str(path), f"adapter of **{run.name}** ({path.stat().st_size / 1024:.0f} KiB zip)"

    def export_merged(self, name: str):
        from .tryout import TryError, merged_model

        run = self.run(name)
        if run is None:
            return None, "Pick a run with a saved adapter."
        try:
            folder, archive = merged_model(run)
        except TryError as e:
            return None, f"**Cannot merge:** {e}"
        except Exception as e:
            return None, _failed(e)
        return str(archive), f"merged model written to `{folder}` (and zipped for download)"

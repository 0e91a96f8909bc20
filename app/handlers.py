"""Event handlers: what each button does. They return inline messages, never raise at the user.

Every handler takes and returns plain values (strings, frames, gr.update), so the same functions
serve the browser and `gradio_client`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
import threading
from pathlib import Path

import gradio as gr
import pandas as pd

from sdft_lite.runs import RunFolder

from . import form as F
from . import views as V
from .jobs import ENDED, JobError, Jobs, shell_command

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


def _started_message(run: RunFolder) -> str:
    status = run.read_status()
    launched = status.get("state") == "running" or status.get("stage") == "starting"
    where = "started" if launched else "queued: it starts when the running training ends"
    return f"Run **{run.name}** {where}. Follow it in the Runs tab."


class Handlers:
    def __init__(self, jobs: Jobs):
        self.jobs = jobs
        self.runs_dir = jobs.runs_dir
        # Start is idempotent: the same form (a double click) gives the same run, not a second one
        # or an "already exists" error. Form -> (run name, outputs of its start).
        self._started: dict[str, tuple[str, str, str, str]] = {}
        self._start_lock = threading.Lock()

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

    def form_updates(
        self, raw: dict | None, message: str, keep: tuple[str, ...] = (), file_name: str | None = None
    ) -> list:
        """Every form value + base + message for a raw recipe (load a recipe, pick the demo model);
        the fields named in `keep` are left as the user set them."""
        outputs = F.SPECIAL + [F.param(k) for k in F.GENERIC_KEYS]
        if raw is None:
            return [gr.update() for _ in outputs] + [gr.update(), message]
        values = F.form_values(raw, file_name)
        updates = [gr.update() if p in keep else values[p] for p in outputs]
        updates[1] = gr.update(
            value=values["model_name"], interactive=values["model_kind"] != F.MODEL_KINDS[0]
        )
        for i, p in enumerate(outputs):  # column dropdowns: allow the loaded names before any preview
            if p in ("data__prompt_column", "data__demonstration_column", "data__answer_column"):
                updates[i] = gr.update(
                    choices=sorted({values[p], F.NO_COLUMN} if p.endswith("answer_column") else {values[p]}),
                    value=values[p],
                )
        return updates + [raw, message]

    def model_kind_changed(self, kind: str, name: str, source: str, base: dict | None):
        """The demo model gets the quickstart's settings (the schema's defaults do not suit it); another
        model keeps the form as it is, without the demo's eval and probe sets."""
        demo = F.demo_recipe()
        if kind == F.MODEL_KINDS[0] and demo is not None:
            note = f"The demo model: settings of `{F.DEMO_RECIPE.relative_to(F.REPO_ROOT)}` filled in."
            return self.form_updates(demo, note, keep=("output__name", "extra_keys"))
        updates = [gr.update() for _ in F.SPECIAL + F.GENERIC_KEYS]
        if kind == F.MODEL_KINDS[0]:
            updates[1] = gr.update(value=F.DEMO_MODEL, interactive=False)
            updates[2] = source or self.demo_data() or ""
            return updates + [gr.update(), ""]
        updates[1] = gr.update(value="" if name == F.DEMO_MODEL else name, interactive=True)
        return updates + [None if base == demo else gr.update(), ""]

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
        """(message, recipe YAML, command, memory plan) for the form: the checks Start makes (recipe,
        data as training reads it, model available here); problems name their recipe key."""
        try:
            recipe, problems = F.build_recipe(values, base, self.runs_dir)
            if recipe is None:
                return F.problems_markdown(problems), "", "", ""
            problems = F.data_problems(recipe)
            run = RunFolder(self.runs_dir / recipe.output.name)
            if run.path.exists() and any(run.path.iterdir()):
                problems.append(f"output.name: a run named '{run.name}' already exists: pick another name")
            yaml_text, cmd = F.recipe_yaml(recipe), shell_command(run)
            if F.model_problem("model.name", recipe.model.name, recipe.model.revision):
                plan = "(no memory plan: it reads the model's config.json, which is not on this machine)"
            else:
                plan = F.plan_text(recipe)
            if problems:
                return F.problems_markdown(problems), yaml_text, cmd, plan
            return f"Recipe OK: run **{run.name}** would train in `{run.path}`.", yaml_text, cmd, plan
        except Exception as e:
            return _failed(e), "", "", ""

    def start(self, base: dict | None = None, **values):
        """Check, then queue the run (it starts at once when no other training is running)."""
        key = json.dumps({"base": base, **values}, sort_keys=True, default=str)
        with self._start_lock:
            if key in self._started:
                name, yaml_text, cmd, plan = self._started[key]
                if self._waiting(name):
                    return _started_message(self.run(name)), yaml_text, cmd, plan
            message, yaml_text, cmd, plan = self.check(base, **values)
            if not message.startswith("Recipe OK"):
                return message, yaml_text, cmd, plan
            recipe, _ = F.build_recipe(values, base, self.runs_dir)
            try:
                run = self.jobs.submit(yaml_text, recipe.output.name)
            except JobError as e:
                return F.problems_markdown([str(e)]), yaml_text, cmd, plan
            self._started = {k: v for k, v in self._started.items() if self._waiting(v[0])}
            self._started[key] = (run.name, yaml_text, cmd, plan)
        self.jobs.tick()  # start it now if nothing else is running
        return _started_message(run), yaml_text, cmd, plan

    def _waiting(self, name: str) -> bool:
        run = self.run(name)
        return run is not None and run.read_status().get("state") in ("queued", "running")

    def load_recipe(self, path: str | None):
        """Fill the form from a recipe YAML path on this machine; every form value + base + message."""
        return self._load_recipe(path, uploaded=False)

    def load_recipe_file(self, path: str | None):
        """Fill the form from an uploaded recipe YAML (its relative paths: see form.read_recipe_file)."""
        return self._load_recipe(path, uploaded=True)

    def _load_recipe(self, path: str | None, uploaded: bool):
        if not path:
            return self.form_updates(None, "Give a recipe file first.")
        raw, note = F.read_recipe_file(path, uploaded)
        return self.form_updates(raw, note, file_name=path)

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
        """progress, error, 4 curves, eval curve, eval note, samples, log tail, status.json of one run."""
        run = self.run(name)
        if run is None:
            return (
                V.progress_html(RunFolder(self.runs_dir / "-")),
                "",
                *[gr.update(value=None, caption=None)] * len(V.CURVES),
                gr.update(value=None, visible=False),
                "",
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
            V.eval_note(run, evals),
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
        """End a training now (no adapter saved). The page asks first (`ask`); the API call is explicit."""
        try:
            return self.jobs.cancel(name)
        except JobError as e:
            return f"**Cannot cancel:** {e}"

    def delete(self, name: str, confirm: bool = False) -> str:
        """Delete a run that ended (failed, stopped, cancelled), only with confirm=True (the page asks
        first): nothing is deleted unless the user said so."""
        if not confirm:
            return f"**Not deleted:** deleting {name} needs confirm=True"
        try:
            return self.jobs.delete(name)
        except JobError as e:
            return f"**Cannot delete:** {e}"

    def ask(self, action: str, name: str | None):
        """Cancel and Delete ask first: (confirmation row, its question, its yes-button, pending action,
        message). A run that the action does not apply to gets the reason at once, no question."""
        run = self.run(name)
        state = run.read_status().get("state") if run else None
        allowed, rule = {
            "cancel": (("queued", "running"), "only a queued or running run can be cancelled"),
            "delete": (ENDED, "only a failed, stopped or cancelled run can be deleted"),
        }[action]
        hidden = gr.update(visible=False), "", gr.update(), None
        if run is None:
            return *hidden, "Pick a run first."
        if state not in allowed:
            return *hidden, f"**Cannot {action}:** {name} is {state}: {rule}"
        if action == "cancel":
            question = (
                f"**Cancel {name} now?** The process is ended at once and no adapter is saved "
                "(*Stop and save* keeps the adapter)."
            )
            yes = f"Yes, cancel {name}"
        else:
            question = f"**Delete {name}?** Its folder `{run.path}` and all in it are removed for good."
            yes = f"Yes, delete {name}"
        return gr.update(visible=True), question, gr.update(value=yes), (action, name), ""

    def confirm(self, pending: tuple | list | None):
        """The confirmed action: (confirmation row hidden, pending cleared, message, selected run)."""
        hide = gr.update(visible=False)
        if not pending:
            return hide, None, "", gr.update()
        action, name = pending
        if action == "cancel":
            return hide, None, self.cancel(name), gr.update()
        message = self.delete(name, confirm=True)
        deleted = not message.startswith("**")
        selected = gr.update(choices=self.run_names(), value=None) if deleted else gr.update()
        return hide, None, message, selected

    def resume(self, name: str) -> str:
        try:
            run = self.jobs.resume(name)
        except JobError as e:
            return f"**Cannot resume:** {e}"
        self.jobs.tick()
        ckpt = run.last_checkpoint()
        return f"{name} queued to resume from {ckpt.name if ckpt else 'step 0 (no checkpoint)'}"

    @staticmethod
    def dismiss():
        return gr.update(visible=False), None, "nothing done"

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
        return base, tuned, f"Adapter used: {V.adapter_description(run)}."

    def export_adapter(self, name: str):
        from .tryout import TryError, adapter_zip

        run = self.run(name)
        if run is None:
            return None, "Pick a run with a saved adapter."
        try:
            path, base_model, note = adapter_zip(run)
        except TryError as e:
            return None, f"**Cannot export:** {e}"
        size = path.stat().st_size / 1024
        message = f"adapter of **{run.name}** ({size:.0f} KiB zip; {V.adapter_description(run)})"
        message += f", base model `{base_model}`"
        return str(path), message + (f". {note}" if note else "")

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

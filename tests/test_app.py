"""The app, driven through its API with gradio_client against a live server (a `python -m app`
subprocess on a free 127.0.0.1 port): real short CPU trainings, the queue, stop / cancel / resume,
an app restart in the middle of a training, and inline messages for bad input.

Uses the built-in demo model when it is packaged, else the tiny model from conftest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import write_jsonl

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

ROOT = Path(__file__).resolve().parents[1]
FINAL = {"completed", "failed", "stopped"}


# --------------------------------------------------------------------------- helpers shared with the browser test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"app exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def demo_available() -> bool:
    try:
        from sdft_lite.demo import demo_data_dir, demo_model_path

        demo_model_path()
        return (demo_data_dir() / "train.jsonl").is_file()
    except Exception:
        return False


def model_fields(tiny_model_dir: Path, data: Path) -> dict:
    """Form values (gradio_client keywords) for a short CPU run on the demo model, else the tiny model."""
    if demo_available():
        from sdft_lite.demo import demo_data_dir

        model = {"model_kind": "built-in demo", "data_source": str(demo_data_dir() / "train.jsonl")}
    else:
        model = {
            "model_kind": "Hub id or local folder",
            "model_name": str(tiny_model_dir),
            "data_source": str(data),
        }
    return {
        **model,
        "model__load_in_4bit": False,
        "model__max_seq_length": 512,
        "model__lora__r": 4,
        "model__lora__alpha": 8,
        "data__max_prompt_tokens": 128,
        "data__max_teacher_prompt_tokens": 384,
        "generation__max_new_tokens": 12,
        "train__batch_size": 2,
        "train__learning_rate": 0.01,
        "train__gradient_checkpointing": False,
        "train__sample_steps": 1,
        "train__save_steps": 2,
        "train__max_steps": 3,
        # The demo's eval sets stay (the Runs tab shows them), at a few rows each.
        "extra_keys": "eval.limit=4\neval.max_new_tokens=8",
    }


def reverse_data(path: Path) -> Path:
    rows = [
        {"prompt": f"reverse {w}", "demonstration": w[::-1], "answer": w[::-1]}
        for w in ["abc", "hello", "cat", "dog", "tree", "moon", "star", "sky"]
    ]
    return write_jsonl(path, rows)


def kill_trainings(runs_dir: Path) -> None:
    """Teardown: end training processes the test left behind (they run in their own session)."""
    from app.jobs import pid_alive
    from sdft_lite.runs import list_runs

    for run in list_runs(runs_dir):
        pid = run.read_status().get("pid")
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- fixtures


class AppProcess:
    """`python -m app` in a subprocess: start, restart (training processes survive), stop."""

    def __init__(self, runs_dir: Path, log_dir: Path):
        self.runs_dir, self.log_dir = runs_dir, log_dir
        self.proc: subprocess.Popen | None = None
        self.client = None
        self.starts = 0

    def start(self):
        port = free_port()
        self.starts += 1
        log = open(self.log_dir / f"app-{self.starts}.log", "wb")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "--runs-dir", str(self.runs_dir), "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{port}/"
        wait_http(self.url, proc=self.proc)
        return self.connect()

    def connect(self):
        """A new client: a new browser session (a loaded recipe does not carry over)."""
        self.client = gradio_client.Client(self.url, verbose=False)
        return self.client

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = self.client = None

    def restart(self):
        self.stop()
        return self.start()


@pytest.fixture(scope="module")
def app_proc(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    server = AppProcess(root / "runs", root)
    server.start()
    yield server
    server.stop()
    kill_trainings(server.runs_dir)


@pytest.fixture(scope="module")
def fields(tiny_model_dir, tmp_path_factory) -> dict:
    return model_fields(tiny_model_dir, reverse_data(tmp_path_factory.mktemp("data") / "train.jsonl"))


def view(client, name: str) -> SimpleNamespace:
    """The Runs tab's outputs for one run, by name."""
    out = client.predict(name=name, api_name="/run_view")
    progress, error, loss, kl, length, tps, evals, eval_note, samples, log, status = out
    return SimpleNamespace(
        progress=progress,
        error=error,
        eval_note=eval_note,
        loss=loss,
        kl=kl,
        length=length,
        tps=tps,
        evals=evals,
        samples=samples,
        log=log,
        status=status,
    )


def table(client) -> dict[str, dict]:
    t = client.predict(api_name="/runs")
    return {row[0]: dict(zip(t["headers"], row, strict=True)) for row in t["data"]}


def wait_for(client, name: str, done, timeout: float = 240, what: str = "") -> SimpleNamespace:
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = view(client, name)
        if done(v.status):
            return v
        assert v.status.get("state") != "failed", f"{name} failed: {v.error}\n{v.log}"
        time.sleep(1)
    raise TimeoutError(
        f"{name}: {what or 'condition'} not reached in {timeout} s; status {v.status}\n{v.log}"
    )


def points(plot: dict | None) -> list:
    """(step, value, series) rows of a plot output (a value, or an update carrying one)."""
    if isinstance(plot, dict) and plot.get("__type__") == "update":
        plot = plot.get("value")
    return plot["data"] if isinstance(plot, dict) and "data" in plot else []


# --------------------------------------------------------------------------- without a server


def test_form_fields_come_from_the_schema(tiny_model_dir, tmp_path):
    from app import form
    from sdft_lite.config import dump_recipe, field_help, load_recipe

    assert all(field_help(key) for key in form.GENERIC_KEYS), "every form field shows the schema's help text"
    data = reverse_data(tmp_path / "train.jsonl")
    raw = {"model": {"name": str(tiny_model_dir)}, "data": {"source": str(data)}, "output": {"name": "r"}}
    # The untouched form gives exactly the recipe the CLI would build from the same file.
    recipe, problems = form.build_recipe(form.form_values(raw), None, tmp_path / "runs")
    assert not problems
    expected = load_recipe(None, data={**raw, "output": {"name": "r", "dir": str(tmp_path / "runs")}})
    assert dump_recipe(recipe) == dump_recipe(expected)
    # Optional numbers are text fields: empty is unset, digits are numbers, anything else is named.
    values = form.form_values(raw) | {
        "train__max_steps": "7",
        "data__limit": "",
        "train__eval_steps": "often",
    }
    recipe, problems = form.build_recipe(values, None, tmp_path / "runs")
    assert recipe is None and len(problems) == 1
    assert problems[0].startswith("train.eval_steps: ") and "'often'" in problems[0]


def test_queue_order_dead_runs_and_cancel_without_processes(tmp_path):
    from app.jobs import JobError, Jobs
    from app.views import ordered_runs, queued_order
    from sdft_lite.runs import RunFolder

    jobs = Jobs(tmp_path / "runs")
    jobs.scheduling = False  # no scheduler lock taken: tick() must start nothing
    first = jobs.submit("model: {name: m}\n", "first")
    second = jobs.submit("model: {name: m}\n", "second")
    assert [r.name for r in queued_order([second, first])] == ["first", "second"]
    crashed = RunFolder(tmp_path / "runs" / "crashed")
    crashed.path.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed.write_status(state="running", pid=dead.pid, step=4, total_steps=10)
    jobs.tick()
    status = crashed.read_status()
    assert status["state"] == "failed" and "no longer running" in status["error"]
    assert "Resume" in status["hint"]
    assert first.read_status()["state"] == "queued"  # not started: this instance does not schedule
    assert jobs.cancel("second") == "second removed from the queue"
    assert second.read_status()["state"] == "stopped"
    # Delete (the page asks first): only runs that ended, never a queued or running one.
    with pytest.raises(JobError, match="only a failed, stopped or cancelled run"):
        jobs.delete("first")
    assert jobs.delete("crashed") == "crashed deleted" and not crashed.path.exists()
    assert "queued" in jobs.resume("second").read_status()["state"]
    # The runs table keeps its order (newest made first) when a queued run starts.
    first.write_status(state="running", pid=os.getpid())
    assert [r.name for r in ordered_runs(tmp_path / "runs")] == ["second", "first"]


def test_recipe_paths_resolve_as_the_cli_does(tmp_path, monkeypatch):
    """An uploaded copy of a shipped recipe (alone in a temp folder) and the path box's example typed
    in an app started outside the repository both find the recipe's data, eval and probe files."""
    from app import form
    from sdft_lite.config import load_recipe

    cli = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    upload = tmp_path / "upload" / "quickstart.yaml"
    upload.parent.mkdir()
    shutil.copyfile(ROOT / "recipes" / "quickstart.yaml", upload)
    monkeypatch.chdir(tmp_path)
    for raw, note in (
        form.read_recipe_file(upload, uploaded=True),
        form.read_recipe_file("recipes/quickstart.yaml"),
    ):
        assert note == "loaded quickstart.yaml", note
        assert raw["data"]["source"] == cli.data.source and raw["data"]["eval_source"] == cli.data.eval_source
        assert [p["source"] for p in raw["eval"]["probes"]] == [p.source for p in cli.eval.probes]
    _, note = form.read_recipe_file(upload)  # not marked as an upload: its own folder, then the cwd
    assert "data.source: file or folder not found: data/demo/train.jsonl" in note


def test_hints_name_app_actions_not_cli_options(tmp_path):
    """status.json's hint is the CLI's; the Runs tab shows what to press in the app instead."""
    from app.views import app_hint, error_markdown
    from sdft_lite.config import RecipeError
    from sdft_lite.errors import describe_failure
    from sdft_lite.runs import RunFolder

    hints = [describe_failure(e)[1] for e in (RecipeError(["x"]), KeyboardInterrupt(), RuntimeError("y"))]
    run = RunFolder(tmp_path / "gone")
    run.path.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.write_status(state="running", pid=dead.pid)
    hints.append(run.read_status().get("hint"))  # a run whose process is gone, as readers see it
    for hint in filter(None, hints):
        shown = app_hint(hint)
        assert "--" not in shown and "sdft-lite " not in shown, shown
        assert "train.log in the run folder" not in shown, shown
    assert "Delete this run" in app_hint(hints[0]) and "Resume" in app_hint(hints[1])
    run.write_status(state="failed", error="bad data", hint=hints[0])
    assert "--overwrite" not in error_markdown(run) and "Delete" in error_markdown(run)


def test_start_twice_is_one_run_and_export_names_the_model(tmp_path, tiny_model_dir):
    """Start is idempotent (a double click); an exported adapter names its base model, not a path."""
    from app import form
    from app.handlers import Handlers
    from app.jobs import Jobs
    from app.tryout import base_model_label
    from sdft_lite.runs import RunFolder

    jobs = Jobs(tmp_path / "runs")
    jobs.scheduling = False  # nothing starts: the second click finds the first one's queued run
    h = Handlers(jobs)
    fields = model_fields(tiny_model_dir, reverse_data(tmp_path / "train.jsonl"))
    first, second = h.start(**fields)[0], h.start(**fields)[0]
    assert "queued" in first and second == first, (first, second)
    assert len([p for p in jobs.runs_dir.iterdir() if p.is_dir()]) == 1
    assert "already exists" in h.check(**fields, output__name=first.split("**")[1])[0]

    # The form starts on the demo's quickstart recipe; another model does not inherit its eval sets.
    demo = form.demo_recipe()
    hub = {**fields, "model_kind": form.MODEL_KINDS[1], "model_name": str(tiny_model_dir)}
    assert form.build_recipe(hub, demo, tmp_path)[0].data.eval_source is None
    assert form.build_recipe(fields | {"model_kind": form.MODEL_KINDS[0]}, demo, tmp_path)[0].data.eval_source

    run = RunFolder(tmp_path / "local")
    run.path.mkdir()
    run.recipe.write_text(f"model: {{name: {json.dumps(str(tiny_model_dir))}}}\n")
    assert base_model_label(run)[0] == tiny_model_dir.name and "local folder" in base_model_label(run)[1]
    run.recipe.write_text("model: {name: Qwen/Qwen2.5-0.5B-Instruct}\n")
    assert base_model_label(run) == ("Qwen/Qwen2.5-0.5B-Instruct", "")


# --------------------------------------------------------------------------- through the API of a live app


def test_bad_input_gives_inline_messages(app_proc, fields, tmp_path):
    c = app_proc.connect()
    msg, yaml_text, cmd, _ = c.predict(
        **{**fields, "train__max_steps": 0, "loss__alpha": 2.0, "generation__temperature": 0.0},
        api_name="/check",
    )
    assert "Cannot start" in msg and "Traceback" not in msg
    for key in ("train.max_steps", "loss.alpha", "generation.temperature"):
        assert key in msg, msg
    assert yaml_text == "" and cmd == ""

    msg = c.predict(
        **{**fields, "model_kind": "Hub id or local folder", "model_name": ""}, api_name="/start"
    )[0]
    assert "model.name" in msg and "started" not in msg

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "demonstration": "b"}\n{"prompt": oops}\n', encoding="utf-8")
    msg = c.predict(**{**fields, "data_source": str(broken)}, api_name="/start")[0]
    assert "data.source" in msg and "line 2 is not valid JSON" in msg, msg
    preview = c.predict(
        source=str(broken),
        split="train",
        prompt_col="prompt",
        demo_col="demonstration",
        answer_col="(none)",
        api_name="/preview_data",
    )
    assert "Cannot read the dataset" in preview[-1] and "line 2" in preview[-1]

    msg = c.predict(**{**fields, "data__prompt_column": "question"}, api_name="/check")[0]
    assert "no column 'question' (data.prompt_column)" in msg, msg
    assert not any(p.name != ".uploads" for p in app_proc.runs_dir.iterdir() if p.is_dir()), (
        "nothing was queued"
    )

    # A recipe file loads into the form; its unknown key is then reported with a did-you-mean.
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(
        f"model: {{name: {json.dumps(str(fields.get('model_name', 'sdft-lite/demo')))}}}\n"
        f"data: {{source: {json.dumps(fields['data_source'])}}}\ntrain: {{max_step: 5}}\n"
    )
    loaded = c.predict(path=str(recipe), api_name="/load_recipe")
    assert "loaded typo.yaml" in loaded[-1]
    msg = c.predict(**fields, api_name="/check")[0]
    assert "unknown key 'train.max_step'" in msg and "did you mean 'train.max_steps'" in msg, msg


def test_train_stop_restart_cancel_resume(app_proc, fields):
    c = app_proc.connect()
    msg = c.predict(**fields, output__name="quick", api_name="/start")[0]
    assert "**quick** started" in msg, msg
    # Never reaches its end here (the demo model did 500 steps during a restart on a fast CPU).
    long_run = {**fields, "train__max_steps": 100_000, "train__save_steps": 1_000_000}
    msg = c.predict(**long_run, output__name="stopme", api_name="/start")[0]
    assert "queued" in msg, msg  # one training at a time: it waits for "quick"
    rows = table(c)
    assert rows["stopme"]["state"] == "queued" and rows["stopme"]["progress"] == "queued #1"

    # A short run completes; its metrics, samples and log are visible through the API.
    v = wait_for(c, "quick", lambda s: s.get("state") in FINAL, what="end")
    assert v.status["state"] == "completed" and v.status["step"] == 3, v.error
    assert [p[0] for p in points(v.loss)] == [1, 2, 3]
    assert len(points(v.kl)) == 3 and len(points(v.tps)) == 3
    sample = dict(zip(v.samples["headers"], v.samples["data"][0], strict=True))
    assert sample["prompt"] and sample["demonstration"] and "completion" in sample
    assert "completed at step 3" in v.log and "3/3" in v.progress
    # Omitted fields take the form's start values: the demo model's quickstart recipe, with eval sets.
    assert points(v.evals) and v.eval_note == ""
    assert (app_proc.runs_dir / "quick" / "adapter" / "adapter_model.safetensors").exists()

    # The queued run starts by itself; a third launch waits behind it.
    wait_for(c, "stopme", lambda s: s.get("state") == "running" and (s.get("step") or 0) >= 1, what="step 1")
    # Long enough that Cancel always catches it running, whatever the machine's speed.
    assert "queued" in c.predict(**long_run, output__name="later", api_name="/start")[0]

    # Restart the app mid-training: the training goes on, the queue is still there.
    c = app_proc.restart()
    rows = table(c)
    assert rows["quick"]["state"] == "completed" and rows["stopme"]["state"] == "running"
    assert rows["later"]["state"] == "queued"

    # Stop and save: the trainer stops after its current step and saves the adapter.
    assert "stop requested" in c.predict(name="stopme", api_name="/stop")
    v = wait_for(c, "stopme", lambda s: s.get("state") in FINAL, what="stop")
    assert v.status["state"] == "stopped" and not v.status.get("error") and 1 <= v.status["step"] < 100_000
    stopme = app_proc.runs_dir / "stopme"
    assert (stopme / "adapter" / "adapter_model.safetensors").exists() and list(
        stopme.glob("checkpoints/checkpoint-*")
    )

    # The new app instance starts the queued run; Cancel ends its process and says so.
    wait_for(c, "later", lambda s: s.get("state") == "running" and s.get("stage") != "starting", what="start")
    assert "cancelled" in c.predict(name="later", api_name="/cancel")
    v = view(c, "later")
    assert v.status["state"] == "stopped" and "cancelled from the app" in v.status["error"] and v.error

    # Resume: queued again and training again (no checkpoint: from step 0); then stopped and saved.
    assert "queued to resume" in c.predict(name="later", api_name="/resume")
    v = wait_for(
        c,
        "later",
        lambda s: s.get("state") == "running" and not s.get("error") and (s.get("step") or 0) >= 1,
        what="resumed training",
    )
    assert "stop requested" in c.predict(name="later", api_name="/stop")
    v = wait_for(c, "later", lambda s: s.get("state") in FINAL, what="resumed stop")
    assert v.status["state"] == "stopped" and not v.status.get("error") and 1 <= v.status["step"] < 100_000
    assert (app_proc.runs_dir / "later" / "adapter" / "adapter_model.safetensors").exists()

    # Another restart: every run is listed with its data.
    c = app_proc.restart()
    rows = table(c)
    assert {n: r["state"] for n, r in rows.items()} == {
        "quick": "completed",
        "stopme": "stopped",
        "later": "stopped",
    }
    assert len(points(view(c, "quick").loss)) == 3 and view(c, "stopme").samples["data"]

    plot, compare = c.predict(names=["quick", "stopme"], metric="loss", api_name="/compare")
    assert {p[2] for p in points(plot)} == {"quick", "stopme"} and "quick" in compare and "stopme" in compare

    base, tuned, note = c.predict(name="quick", prompt="reverse abc", max_new_tokens=8, api_name="/try")
    assert note.startswith("Adapter used: the final adapter (`quick/adapter`"), note
    assert isinstance(base, str) and isinstance(tuned, str)
    zipped, note = c.predict(name="stopme", api_name="/export_adapter")
    assert zipped and Path(zipped).stat().st_size > 0 and "adapter of **stopme**" in note
    zipped, note = c.predict(name="quick", api_name="/export_merged")  # trained unquantized: merge allowed
    assert zipped and "merged model written" in note
    assert (app_proc.runs_dir / "quick" / "merged" / "model.safetensors").exists()
    # Delete through the API needs confirm=True (the page asks first); then the run is gone.
    assert "Not deleted" in c.predict(name="stopme", confirm=False, api_name="/delete")
    assert c.predict(name="stopme", confirm=True, api_name="/delete") == "stopme deleted"
    assert "stopme" not in table(c) and not (app_proc.runs_dir / "stopme").exists()

"""Nothing lost, and the run folder tells the truth: `sdft-lite train` as a user runs it, against
an existing run, with bad data, bad names, signals, kill -9, an interrupted checkpoint, a stale
STOP file and a diverging learning rate."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe, write_jsonl

from sdft_lite.runs import RunFolder, read_jsonl

ROWS = [
    {"prompt": f"reverse {w}", "demonstration": w[::-1], "answer": w[::-1]}
    for w in ["abc", "hello", "cat", "dog", "tree", "moon", "star", "sky"]
]


def cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdft_lite.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def user_error(res: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, an `error:` line, no traceback, and every word in the message."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "error:" in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    for w in words:
        assert w in res.stderr, (w, res.stderr[-3000:])


def files_of(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (train.log aside: a refused attempt may not log)."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "train.log"
    }


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe path, run folder) of a completed 3-step run with checkpoints at steps 2 and 3."""
    root = tmp_path_factory.mktemp("finished")
    data = write_jsonl(root / "train.jsonl", ROWS)
    recipe = tiny_recipe(tiny_model_dir, data, root / "runs", train={"max_steps": 3, "save_steps": 2})
    path = root / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = cli("train", str(path), cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    return path, root / "runs" / "run"


@pytest.fixture
def work(finished, tmp_path) -> tuple[Path, RunFolder]:
    """A private copy of the finished run (and its recipe pointing at it) for one test."""
    recipe_path, run_dir = finished
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["output"]["dir"] = str(tmp_path / "runs")
    shutil.copytree(run_dir, tmp_path / "runs" / "run")
    shutil.copy(Path(recipe["data"]["source"]), tmp_path / "train.jsonl")
    recipe["data"]["source"] = str(tmp_path / "train.jsonl")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, RunFolder(tmp_path / "runs" / "run")


def broken_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "broken.jsonl", [{"question": "no prompt column here"}])


def test_overwrite_and_resume_with_broken_data_keep_the_finished_run(work, tmp_path):
    path, run = work
    before = files_of(run.path)
    bad = f"data.source={broken_data(tmp_path)}"
    user_error(cli("train", str(path), bad, "--overwrite", cwd=tmp_path), "data.source", "prompt")
    assert files_of(run.path) == before  # nothing deleted: the data is checked first
    user_error(cli("train", str(path), bad, "train.max_steps=6", "--resume", cwd=tmp_path), "data.source")
    assert files_of(run.path) == before  # status still completed, recipe.yaml not replaced
    assert run.read_status()["state"] == "completed"


def test_resume_refuses_what_it_cannot_continue(work, tmp_path):
    path, run = work
    before = files_of(run.path)
    # A completed run with the same budget: nothing to continue.
    user_error(cli("train", str(path), "--resume", cwd=tmp_path), "already completed", "train.max_steps")
    # A name that does not exist (a typo): not a silent new run.
    res = cli("train", str(path), "--resume", "--name", "rnu", cwd=tmp_path)
    user_error(res, "no run 'rnu'", "runs there: run", "drop --resume")
    assert not (run.path.parent / "rnu").exists()
    # No checkpoint: not a silent restart from step 0 that replaces the adapter.
    shutil.rmtree(run.checkpoints)
    run.checkpoints.mkdir()
    user_error(
        cli("train", str(path), "train.max_steps=6", "--resume", cwd=tmp_path), "no checkpoint", "--overwrite"
    )
    assert files_of(run.path) == {k: v for k, v in before.items() if not k.startswith("checkpoints")}


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a/b", ".", "..", "a" * 300, ".hidden"])
def test_run_names_stay_one_folder_inside_output_dir(work, tmp_path, name):
    path, run = work
    before = files_of(run.path)
    user_error(cli("train", str(path), "--name", name, "--overwrite", cwd=tmp_path), "output.name")
    assert files_of(run.path) == before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run"]
    assert not (tmp_path / "x").exists() and not Path("/tmp/abs").exists()


def test_output_dir_that_is_a_file(work, tmp_path):
    path, _ = work
    (tmp_path / "afile").write_text("not a folder")
    user_error(
        cli("train", str(path), f"output.dir={tmp_path / 'afile'}", cwd=tmp_path), "output.dir", "is a file"
    )
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_overwrite_refuses_a_folder_that_is_not_a_run(work, tmp_path):
    path, _ = work
    keep = tmp_path / "runs" / "notes"
    keep.mkdir()
    (keep / "todo.txt").write_text("mine")
    user_error(cli("train", str(path), "--name", "notes", "--overwrite", cwd=tmp_path), "not a run folder")
    assert (keep / "todo.txt").read_text() == "mine"


def test_a_run_the_app_is_starting_is_not_replaced(work, tmp_path):
    """The app's queue marks a launched run `queued` (stage `starting`) under its child's pid until
    the trainer writes its own status: in that window the folder is in use too."""
    path, run = work
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        status = json.loads(run.status_file.read_text())
        run.write_status(state="queued", stage="starting", pid=child.pid)
        before = files_of(run.path)
        user_error(cli("train", str(path), "--overwrite", cwd=tmp_path), "still training", f"pid {child.pid}")
        user_error(cli("train", str(path), "train.max_steps=6", "--resume", cwd=tmp_path), "still training")
        assert files_of(run.path) == before
    finally:
        child.kill()
        child.wait()
    assert status["state"] == "completed"


def test_interrupted_checkpoint_is_passed_over_on_resume(work, tmp_path):
    """A save cut short (Ctrl-C twice, power loss) leaves a partial folder: resume continues from
    the last complete checkpoint, and checkpoints themselves appear only when complete."""
    path, run = work
    assert not (run.checkpoints / ".staging").exists()
    complete = sorted(p.name for p in run.checkpoints.iterdir())
    assert complete == ["checkpoint-2", "checkpoint-3"]
    assert all((run.checkpoints / c / "trainer_state.json").is_file() for c in complete)
    assert all((run.checkpoints / c / "recipe.yaml").is_file() for c in complete)
    partial = run.checkpoints / "checkpoint-4"  # what an interrupted in-place save left behind
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{")
    (run.checkpoints / ".staging" / "checkpoint-5").mkdir(parents=True)
    assert run.last_checkpoint().name == "checkpoint-3"
    res = cli("train", str(path), "train.max_steps=5", "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in run.log_file.read_text() and "checkpoint-3" in run.log_file.read_text()
    status = run.read_status()
    assert status["state"] == "completed" and status["step"] == 5
    assert [m["step"] for m in read_jsonl(run.metrics)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["checkpoint-4", "checkpoint-5"]
    assert (run.checkpoints / "checkpoint-4" / "trainer_state.json").is_file()


def wait_for_step(run: RunFolder, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        if (run.read_status(raw=True).get("step") or 0) >= step and run.last_checkpoint() is not None:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def start_long_run(path: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sdft_lite.cli", "train", str(path), *extra],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_running_run_kill_signals_and_stale_stop(tiny_model_dir, tmp_path):
    """A run in training cannot be overwritten or resumed under itself; kill -9 shows it as
    interrupted (never running) and `stop` says its process is gone; resume continues from its
    last checkpoint and ignores a STOP written for the dead process; SIGTERM stops it after the
    current step with a checkpoint and the adapter saved."""
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    recipe = tiny_recipe(
        tiny_model_dir,
        data,
        tmp_path / "runs",
        train={"max_steps": 100_000, "save_steps": 2},
        eval={"before": False},
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = RunFolder(tmp_path / "runs" / "run")
    runs_dir = str(tmp_path / "runs")

    proc = start_long_run(path, tmp_path)
    try:
        wait_for_step(run, proc, 2)
        assert run.read_status()["state"] == "running"
        user_error(cli("train", str(path), "--overwrite", cwd=tmp_path), "still training", "sdft-lite stop")
        user_error(cli("train", str(path), "--resume", cwd=tmp_path), "still training")
        assert run.path.is_dir() and proc.poll() is None  # untouched, still training

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert run.read_status(raw=True)["state"] == "running"  # what the killed process left
    assert run.read_status()["state"] == "interrupted"
    listing = cli("runs", "--runs-dir", runs_dir, cwd=tmp_path)
    assert listing.returncode == 0 and "interrupted" in listing.stdout and "running" not in listing.stdout
    user_error(cli("stop", "run", "--runs-dir", runs_dir, cwd=tmp_path), "is gone", "--resume")
    assert not run.stop_file.exists()
    # A STOP written for the dead process (an older version, or a race with its death).
    dead_pid = run.read_status(raw=True)["pid"]
    run.stop_file.write_text(json.dumps({"pid": dead_pid}))
    ckpt = run.last_checkpoint()
    resumed_from = int(ckpt.name.split("-")[1])

    proc = start_long_run(path, tmp_path, "--resume")
    try:
        wait_for_step(run, proc, resumed_from + 2)
        assert run.read_status()["state"] == "running"  # the stale STOP was not obeyed
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    finally:
        proc.kill()
    status = run.read_status()
    assert status["state"] == "stopped" and "SIGTERM" in status["error"], status
    assert status["step"] > resumed_from
    assert run.last_checkpoint().name == f"checkpoint-{status['step']}"  # saved at the stop
    assert (run.adapter / "adapter_model.safetensors").is_file()
    steps = [m["step"] for m in read_jsonl(run.metrics)]
    assert steps == list(range(1, status["step"] + 1))  # killed steps dropped, none twice


def test_diverged_run_fails_or_skips_by_recipe(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    recipe = tiny_recipe(
        tiny_model_dir,
        data,
        tmp_path / "runs",
        train={"max_steps": 4, "learning_rate": 1.0e30, "save_steps": 100},
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = RunFolder(tmp_path / "runs" / "run")
    res = cli("train", str(path), cwd=tmp_path)
    user_error(res, "diverged")
    status = run.read_status()
    assert status["state"] == "failed" and "diverged" in status["error"]
    assert "train.learning_rate" in status["hint"] and "on_nonfinite" in status["hint"]
    assert not run.adapter.exists()  # a diverged run has no "final" adapter
    listing = cli("runs", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert "failed" in listing.stdout and "diverged" in listing.stdout

    res = cli("train", str(path), "train.on_nonfinite=skip", "--overwrite", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    status = run.read_status()
    assert status["state"] == "completed" and status["skipped_steps"] >= 1
    metrics = read_jsonl(run.metrics)
    assert metrics[-1]["skipped_steps"] == status["skipped_steps"]
    assert "skipped" in cli("runs", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path).stdout


def test_same_recipe_and_seed_give_the_same_losses_and_completions(tmp_path):
    """Two runs of one recipe on one machine, fast paths on (the paths are fixed rules, recorded
    in status.json): identical losses and identical sampled completions."""
    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    overrides = ["train.max_steps=3", "train.sample_steps=1", "eval.before=false", "eval.after=false"]
    runs = []
    for name in ("a", "b"):
        res = cli(
            "train",
            str(quickstart),
            *overrides,
            f"output.dir={tmp_path / 'runs'}",
            "--name",
            name,
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(RunFolder(tmp_path / "runs" / name))
    a, b = ([(m["loss"], m["kl"]) for m in read_jsonl(r.metrics)] for r in runs)
    assert len(a) == 3 and a == b
    a, b = ([s["completion"] for s in read_jsonl(r.samples)] for r in runs)
    assert len(a) >= 3 and a == b
    paths = [r.read_status()["paths"] for r in runs]
    assert paths[0] == paths[1] and paths[0]["generation_engine"] == "sdft" and "head_layout" in paths[0]

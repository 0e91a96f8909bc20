"""Training processes and the queue. The queue lives in the run folders, not in memory.

A launch writes `<runs_dir>/<name>/recipe.yaml` and a status.json with state `queued`; a
scheduler thread starts the oldest queued run when fewer than `max_running` trainings are
alive, as a subprocess:

    python -m sdft_lite.cli train <run>/recipe.yaml output.dir=<runs_dir> output.name=<name> --resume

`--resume` because the app has already created the folder: with no checkpoint in it the run
starts from step 0; for "Resume" it continues from the last checkpoint. The training process
writes status.json itself from then on. The process runs in its own session, so stopping or
restarting the app does not stop training; a new app instance finds running runs by the pid in
status.json and queued runs by their state, and carries on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from sdft_lite.runs import (
    FINAL_STATES,
    RunFolder,
    atomic_write_json,
    atomic_write_text,
    list_runs,
    now_iso,
    process_alive,
)

from .views import CONSOLE_LOG, is_run_name, queued_order

log = logging.getLogger(__name__)
CANCEL_GRACE_S = 10.0  # SIGTERM first; SIGKILL if the process has not exited by then
STARTING = "starting"  # stage of a queued run whose process the app has started
ENDED = ("failed", "stopped", "interrupted")  # runs that can be resumed or deleted


class JobError(Exception):
    """A user-facing refusal (unknown run, wrong state...); the message says why."""


def pid_alive(pid: int | None) -> bool:
    """A live training process: `runs.process_alive`, and (where /proc exists) running sdft-lite,
    not another program that got the pid."""
    if not process_alive(pid):
        return False
    if not Path("/proc/self").exists():
        return True  # no procfs (macOS): os.kill is all we can tell
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"sdft_lite" in cmdline or b"sdft-lite" in cmdline


def _override_value(text: str) -> str:
    """A string as a `key=value` override: JSON-quoted only when YAML would read it as something else."""
    try:
        plain = yaml.safe_load(text) == text
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


def train_command(run: RunFolder) -> list[str]:
    """The exact command the app runs for a queued run (new or resumed)."""
    return [
        sys.executable,
        "-m",
        "sdft_lite.cli",
        "train",
        str(run.recipe),
        f"output.dir={_override_value(str(run.path.parent))}",
        f"output.name={_override_value(run.name)}",
        "--resume",
    ]


def shell_command(run: RunFolder) -> str:
    """`train_command` as a user would type it."""
    import shlex

    return "sdft-lite " + " ".join(shlex.quote(a) for a in train_command(run)[3:])


class Jobs:
    """Starts queued runs one at a time (by default), watches them, stops and cancels them."""

    def __init__(self, runs_dir: str | Path, max_running: int = 1, poll_s: float = 1.0):
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.max_running = max_running
        self.poll_s = poll_s
        self.procs: dict[str, subprocess.Popen] = {}  # children of this app instance, by run name
        self._lock = threading.RLock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_file = None
        self.scheduling = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Jobs:
        """Take the runs dir's queue lock (one scheduler per folder) and start the scheduler thread."""
        self.scheduling = self._take_queue_lock()
        if not self.scheduling:
            log.warning(
                "another app instance runs the queue of %s: this one shows runs and queues new ones, "
                "the other starts them",
                self.runs_dir,
            )
        self._thread = threading.Thread(target=self._loop, name="sdft-lite-queue", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop scheduling. Training processes keep running (an app restart must not lose them)."""
        self._halt.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self._lock_file:
            self._lock_file.close()
            self._lock_file = None

    def _take_queue_lock(self) -> bool:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; assume one app per runs dir
            return True
        f = open(self.runs_dir / ".queue.lock", "a+")  # noqa: SIM115 - held for the app's lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._lock_file = f
        return True

    def _loop(self) -> None:
        while not self._halt.is_set():
            try:
                self.tick()
            except Exception:  # the scheduler must outlive a bad run folder
                log.exception("queue tick failed")
            self._halt.wait(self.poll_s)

    # ------------------------------------------------------------------ scheduling
    def tick(self) -> None:
        """Reap finished children, mark runs whose process died, start queued runs if there is room."""
        with self._lock:
            for name, proc in list(self.procs.items()):
                if proc.poll() is not None:
                    del self.procs[name]
                    self._finish(RunFolder(self.runs_dir / name), proc.returncode)
            runs = list_runs(self.runs_dir)
            running = 0
            for run in runs:
                status = run.read_status(raw=True)  # raw: a dead process still reads `running` here
                if status.get("state") not in ("running", "queued") or not _launched(status):
                    continue
                if run.name in self.procs or pid_alive(status.get("pid")):
                    running += 1
                else:
                    self._finish(run, None)
            if not self.scheduling:
                return
            for run in queued_order(runs)[: max(0, self.max_running - running)]:
                self._spawn(run)

    def _spawn(self, run: RunFolder) -> None:
        cmd = train_command(run)
        log.info("starting %s: %s", run.name, " ".join(cmd))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(run.path / CONSOLE_LOG, "ab") as out:
            out.write(f"\n[{now_iso()}] app: {shell_command(run)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.procs[run.name] = proc
        # Until the trainer writes its own status: still `queued` (the trainer refuses to start a run
        # that reads `running` under a live pid), stage `starting`, under the child's pid.
        run.write_status(state="queued", pid=proc.pid, stage=STARTING, error=None, hint=None)

    def _finish(self, run: RunFolder, returncode: int | None) -> None:
        """A process ended: if it did not record a final state, record why it ended."""
        status = run.read_status(raw=True)
        if status.get("state") in FINAL_STATES or not _launched(status):
            return
        if returncode is None:
            error = (
                f"the training process (pid {status.get('pid')}) is no longer running and did not record an "
                "end state: it was killed or crashed"
            )
        else:
            error = _console_error(run) or f"the training process exited with code {returncode}"
        run.write_status(
            state="failed", error=error, stage=None, hint=_resume_hint(run) + "; see the log below"
        )

    # ------------------------------------------------------------------ actions
    def submit(self, recipe_yaml: str, name: str) -> RunFolder:
        """Create a queued run folder: recipe.yaml + status.json (state queued). The scheduler starts it."""
        run = RunFolder(self.runs_dir / name)
        with self._lock:
            if run.path.exists() and any(run.path.iterdir()):
                raise JobError(
                    f"a run named '{name}' already exists in {self.runs_dir}: pick another output.name"
                )
            run.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run.recipe, recipe_yaml)
            _write_queued(run, fresh=True)
        return run

    def resume(self, name: str) -> RunFolder:
        """Queue a failed or stopped run again; it continues from its last checkpoint (or step 0)."""
        run = self._run(name)
        with self._lock:
            state = run.read_status().get("state")
            if state not in ENDED:
                raise JobError(
                    f"run {name} is {state}: only failed, stopped or interrupted runs can be resumed"
                )
            if not run.recipe.exists():
                raise JobError(f"run {name} has no recipe.yaml to resume from")
            if run.last_checkpoint() is None:
                # Starting over: drop the records of the attempt that left no checkpoint.
                for path in (run.metrics, run.samples, run.eval_file):
                    path.unlink(missing_ok=True)
            _write_queued(run, fresh=False)
        return run

    def delete(self, name: str) -> str:
        """Remove a failed or stopped (cancelled included) run's folder. The app asks the user first."""
        run = self._run(name)
        with self._lock:
            status = run.read_status()
            state = status.get("state")
            if state not in ENDED or name in self.procs or pid_alive(status.get("pid")):
                raise JobError(
                    f"run {name} is {state}: only a failed, stopped or cancelled run can be deleted"
                )
            shutil.rmtree(run.path)
        return f"{name} deleted"

    def stop(self, name: str) -> str:
        """Graceful: the trainer stops after its current step and saves the adapter (the STOP file)."""
        run = self._run(name)
        status = run.read_status()
        state = status.get("state")
        if state == "queued" and not _launched(status):
            return self.cancel(name)
        if state not in ("running", "queued"):
            raise JobError(f"run {name} is not running (state: {state})")
        run.request_stop()
        return f"stop requested: {name} will save its adapter and stop after the current step"

    def cancel(self, name: str) -> str:
        """End the process now (no adapter is saved) and record state `stopped` with the reason."""
        run = self._run(name)
        with self._lock:
            status = run.read_status()
            state, step = status.get("state"), status.get("step") or 0
            if state == "queued" and not _launched(status):
                run.write_status(
                    state="stopped",
                    stage=None,
                    error="cancelled before it started",
                    hint="start it again with Resume",
                )
                return f"{name} removed from the queue"
            if state not in ("running", "queued"):
                raise JobError(f"run {name} is not running (state: {state})")
            proc = self.procs.pop(name, None)
            self._terminate(proc, status.get("pid"))
            run.write_status(
                state="stopped",
                stage=None,
                pid=status.get("pid"),
                error=f"cancelled from the app at step {step}: the process was ended, no adapter saved",
                hint=_resume_hint(run),
            )
        return f"{name} cancelled at step {step}"

    def _terminate(self, proc: subprocess.Popen | None, pid: int | None) -> None:
        """Cancel: two SIGTERMs (the trainer's first one would stop after the step and save; the
        second interrupts at once), then SIGKILL if it has not exited within the grace time."""
        if proc is not None:
            proc.terminate()
            time.sleep(0.2)
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(CANCEL_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return
        if not pid_alive(pid):  # started by an earlier app instance or the CLI: not our child
            return
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.2)
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
        deadline = time.time() + CANCEL_GRACE_S
        while pid_alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    def _run(self, name: str) -> RunFolder:
        if not name:
            raise JobError("pick a run first")
        if not is_run_name(name):
            raise JobError(f"'{name}' is not a run name")
        run = RunFolder(self.runs_dir / name)
        if not run.status_file.exists():
            raise JobError(f"no run named '{name}' in {self.runs_dir}")
        return run


def _launched(status: dict) -> bool:
    """The run has a process: `running`, or `queued` with the app's child still starting."""
    return status.get("state") == "running" or status.get("stage") == STARTING


def _write_queued(run: RunFolder, fresh: bool) -> None:
    status = {} if fresh else run.read_status()
    # queued_time (epoch seconds) orders the queue; queued_at (second resolution) is for people.
    status.update(
        state="queued",
        pid=None,
        stage=None,
        error=None,
        hint=None,
        queued_at=now_iso(),
        queued_time=time.time(),
        updated_at=now_iso(),
    )
    if fresh:
        status.update(step=0, total_steps=None, created_time=time.time())
    # Written directly, not with RunFolder.write_status: `started_at` is set when training starts.
    atomic_write_json(run.status_file, status)


def _resume_hint(run: RunFolder) -> str:
    ckpt = run.last_checkpoint()
    if ckpt is None:
        return "no checkpoint was saved: Resume starts the run again from step 0"
    return f"Resume continues from {ckpt.name}"


def _console_error(run: RunFolder) -> str | None:
    """The CLI's `error: ...` message (user errors before training starts go to the console only)."""
    try:
        lines = (run.path / CONSOLE_LOG).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("error: "):
            return "\n".join([lines[i].removeprefix("error: "), *lines[i + 1 :]]).strip()
    return None

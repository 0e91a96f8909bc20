"""The run folder: the contract that the CLI writes and the app and notebooks read.

runs/<name>/
  recipe.yaml      resolved recipe (absolute paths, every default filled in)
  status.json      state queued|running|completed|failed|stopped, pid, step, total_steps, times, error, hint
                   (readers see `interrupted` for a `running` run whose process is gone)
  metrics.jsonl    one JSON object per logging step
  samples.jsonl    example rollouts every train.sample_steps
  train.log        the log of the training process
  checkpoints/     checkpoint-<step>/ (Trainer state, adapters, ema_shadow.pt, recipe.yaml), each written
                   in a temporary folder and renamed when complete
  adapter/         the final LoRA adapter (+ tokenizer), written last, atomically
  STOP             created by `sdft-lite stop` or the app for the process it names: that trainer stops
                   after its current step and saves

Files that readers poll are written atomically (temp file + rename), JSONL lines are appended
whole, so a reader never sees half a record.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import UserError

STATES = ("queued", "running", "completed", "failed", "stopped", "interrupted")
FINAL_STATES = ("completed", "failed", "stopped")
# Not written by any process: what readers see for a `running` run whose process is gone.
INTERRUPTED = "interrupted"


_IMPORTED_AT = time.time()


def _process_start_time() -> float:
    """Wall-clock start of this process (Linux: boot time + start ticks; elsewhere: import time)."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return _IMPORTED_AT


def process_start_time(pid: int) -> float | None:
    """Clock ticks since boot at which `pid` started (Linux), to tell it from a later process that
    got the same pid; None where there is no /proc."""
    try:
        return float(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int | None, started: float | None = None) -> bool:
    """Whether the process `pid` still runs (not a zombie) and, when `started` (its
    `process_start_time`) is known, is that same process and not a newer one with its pid."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return False
    if not Path("/proc/self/stat").exists():
        return True  # no procfs (macOS): os.kill is all we can tell
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (OSError, IndexError):
        return False  # exited between the two looks
    return started is None or process_start_time(pid) == started


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    # One write() of one line in append mode: readers see whole lines or nothing.
    line = json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written right now
    return out


class RunExistsError(UserError):
    """The run folder's state does not allow what was asked (exists, is running, has nothing to resume)."""


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # paths
    recipe = property(lambda self: self.path / "recipe.yaml")
    status_file = property(lambda self: self.path / "status.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    samples = property(lambda self: self.path / "samples.jsonl")
    log_file = property(lambda self: self.path / "train.log")
    checkpoints = property(lambda self: self.path / "checkpoints")
    adapter = property(lambda self: self.path / "adapter")
    stop_file = property(lambda self: self.path / "STOP")
    eval_file = property(lambda self: self.path / "eval.json")

    @property
    def name(self) -> str:
        return self.path.name

    def exists(self) -> bool:
        return self.path.exists() and any(self.path.iterdir())

    def prepare(self, if_exists: str) -> None:
        """Create the folder. An existing run is kept unless the user asked to resume or overwrite."""
        if self.exists():
            if if_exists == "error":
                raise RunExistsError(
                    f"run folder {self.path} already exists. Pick another output.name, or pass --resume "
                    f"(output.if_exists=resume) to continue it, or --overwrite (output.if_exists=overwrite) to replace it."
                )
            if if_exists == "overwrite":
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        # A stop left over for an earlier process is cleared; one requested for this process
        # (e.g. by the app while we were still importing) is kept and honoured.
        exists, pid = self._stop_target()
        if exists and pid != os.getpid():
            if pid is not None or self.stop_file.stat().st_mtime < _process_start_time():
                self.stop_file.unlink(missing_ok=True)

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint: checkpoints are renamed into place once written (see
        `trainer.SDFTTrainer._save_checkpoint`); one without its trainer state (e.g. from an older
        version, interrupted) is passed over for the one before it."""
        cks = [
            p
            for p in self.checkpoints.glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
        ]
        return max(cks, key=lambda p: int(p.name.split("-")[-1])) if cks else None

    # status
    def read_status(self, raw: bool = False) -> dict:
        """status.json as written; unless `raw`, a `running` run whose process is gone (killed,
        crashed, machine restarted) reads as `interrupted`, with a hint to resume it."""
        try:
            status = json.loads(self.status_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        if not isinstance(status, dict):
            return {}
        if not raw and status.get("state") == "running" and not self.process_alive(status):
            status.update(
                state=INTERRUPTED,
                stage=None,
                error=status.get("error")
                or f"the training process (pid {status.get('pid')}) is gone: it was killed or crashed",
                hint=f"resume it from its last checkpoint: sdft-lite train {self.recipe} --resume",
            )
        return status

    @staticmethod
    def process_alive(status: dict) -> bool:
        return process_alive(status.get("pid"), status.get("pid_started"))

    def is_running(self) -> bool:
        return self.read_status().get("state") == "running"

    def write_status(self, **fields: Any) -> dict:
        status = self.read_status(raw=True)
        if "started_at" not in status:
            status["started_at"] = now_iso()
        status.update(fields)
        status["updated_at"] = now_iso()
        status.setdefault("pid", os.getpid())
        if status["pid"] == os.getpid():
            status["pid_started"] = process_start_time(os.getpid())
        elif "pid" in fields:
            status["pid_started"] = process_start_time(status["pid"]) if status["pid"] else None
        atomic_write_json(self.status_file, status)
        return status

    def request_stop(self) -> None:
        """Ask the process that runs this training now (status.json's pid) to stop and save."""
        pid = self.read_status(raw=True).get("pid")
        atomic_write_json(self.stop_file, {"pid": pid, "requested_at": now_iso()})

    def stop_requested(self) -> bool:
        """A STOP meant for this process: one that names another (a process that was already gone
        when `stop` ran, an earlier attempt) is not obeyed by a later `--resume`."""
        exists, pid = self._stop_target()
        return exists and pid in (None, os.getpid())

    def _stop_target(self) -> tuple[bool, int | None]:
        """(STOP exists, the pid it was written for; None for an older plain-text STOP)."""
        try:
            text = self.stop_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return False, None
        except OSError:
            return True, None
        try:
            pid = json.loads(text).get("pid")
        except (json.JSONDecodeError, AttributeError):
            pid = None
        return True, pid if isinstance(pid, int) else None


def list_runs(runs_dir: str | Path) -> list[RunFolder]:
    root = Path(runs_dir)
    if not root.exists():
        return []
    runs = [RunFolder(p) for p in root.iterdir() if p.is_dir() and (p / "status.json").exists()]
    return sorted(runs, key=lambda r: r.read_status().get("started_at", ""), reverse=True)

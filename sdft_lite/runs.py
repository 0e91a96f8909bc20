"""The run folder: the contract that the CLI writes and the app and notebooks read.

runs/<name>/
  recipe.yaml      resolved recipe (absolute paths, every default filled in)
  status.json      state queued|running|completed|failed|stopped, pid, step, total_steps, times, error, hint
  metrics.jsonl    one JSON object per logging step
  samples.jsonl    example rollouts every train.sample_steps
  train.log        the log of the training process
  checkpoints/     checkpoint-<step>/ (Trainer state, adapters, ema_shadow.pt, recipe.yaml)
  adapter/         the final LoRA adapter (+ tokenizer), written last, atomically
  STOP             created by `sdft-lite stop` or the app: the trainer stops at the next step and saves

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

STATES = ("queued", "running", "completed", "failed", "stopped")
FINAL_STATES = ("completed", "failed", "stopped")


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


class RunExistsError(Exception):
    pass


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
        # A stop left over from an earlier process is cleared; one requested after this process
        # started (e.g. by the app while we were still importing) is kept and honoured.
        if self.stop_file.exists() and self.stop_file.stat().st_mtime < _process_start_time():
            self.stop_file.unlink(missing_ok=True)

    def last_checkpoint(self) -> Path | None:
        cks = [p for p in self.checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        return max(cks, key=lambda p: int(p.name.split("-")[-1])) if cks else None

    # status
    def read_status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write_status(self, **fields: Any) -> dict:
        status = self.read_status()
        if "started_at" not in status:
            status["started_at"] = now_iso()
        status.update(fields)
        status["updated_at"] = now_iso()
        status.setdefault("pid", os.getpid())
        atomic_write_json(self.status_file, status)
        return status

    def request_stop(self) -> None:
        self.stop_file.write_text(now_iso() + "\n")

    def stop_requested(self) -> bool:
        return self.stop_file.exists()


def list_runs(runs_dir: str | Path) -> list[RunFolder]:
    root = Path(runs_dir)
    if not root.exists():
        return []
    runs = [RunFolder(p) for p in root.iterdir() if p.is_dir() and (p / "status.json").exists()]
    return sorted(runs, key=lambda r: r.read_status().get("started_at", ""), reverse=True)

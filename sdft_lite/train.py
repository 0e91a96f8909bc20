"""The entry path, top to bottom: recipe -> run folder -> data -> model -> teacher -> train -> save."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from .config import Recipe, RecipeError, dump_recipe, run_name_problem
from .errors import UserError, is_user_error
from .runs import RunExistsError, RunFolder, atomic_write_text, list_runs

log = logging.getLogger(__name__)


class TrainError(UserError):
    """A user-facing failure during setup (bad rows, unsupported option...)."""


def run_folder_for(recipe: Recipe, recipe_path: str | Path | None) -> RunFolder:
    return RunFolder(Path(recipe.output.dir) / recipe.run_name(recipe_path))


def _attach_log_file(run: RunFolder) -> logging.Handler:
    handler = logging.FileHandler(run.log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("sdft_lite", "transformers", "peft"):
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("sdft_lite").setLevel(logging.INFO)
    return handler


def _detach_log_file(handler: logging.Handler) -> None:
    for name in ("sdft_lite", "transformers", "peft"):
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def train(recipe: Recipe, recipe_path: str | Path | None = None, announce=None) -> RunFolder:
    """Train per the recipe; returns the finished run folder. Raises on failure (status.json says why).

    Everything that can be checked is checked before the run folder is touched (`preflight`), so
    a bad recipe, data file or model never costs an existing run its files or its status.
    `announce(run)` is called once the run folder is ready (the CLI prints where it is)."""
    import time

    run = run_folder_for(recipe, recipe_path)
    checked = preflight(recipe, run)
    if recipe.output.if_exists == "overwrite" and run.path.exists():
        shutil.rmtree(run.path)
    run.prepare(recipe.output.if_exists)
    if announce is not None:
        announce(run)
    ckpt = checked.checkpoint
    if ckpt is not None:
        _truncate_metrics(run, int(ckpt.name.split("-")[-1]))
    recipe_yaml = dump_recipe(recipe)
    atomic_write_text(run.recipe, recipe_yaml)
    start = time.time()
    run.write_status(
        state="running",
        pid=os.getpid(),
        step=0,
        total_steps=None,
        error=None,
        hint=None,
        stage="loading data",
        wall_seconds=None,
    )
    handler = _attach_log_file(run)
    signals = StopSignals()
    try:
        with signals:
            trainer = build_trainer(recipe, run, recipe_yaml, checked, signals)
            if ckpt is not None:
                log.info("resuming from %s", ckpt)
                if trainer.teacher is not None and (ckpt / "ema_shadow.pt").exists():
                    import torch

                    trainer.teacher.load_state_dict(torch.load(ckpt / "ema_shadow.pt", map_location="cpu"))
            elif recipe.eval.before and trainer.evaluator.sets:
                run.write_status(stage="evaluating before training")
                trainer.evaluator("before", 0, base=True)
                if recipe.eval.teacher:
                    trainer.evaluator("teacher", 0, base=True, as_teacher=True)
            run.write_status(stage="training")
            signals.training = True
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
            run.write_status(stage="saving the adapter")
            save_adapter(trainer.model, trainer.processing_class, run)
            signals.training = False  # from here a signal interrupts at once: nothing half-written
            if recipe.eval.after and trainer.evaluator.sets and not signals.received:
                run.write_status(stage="evaluating after training")
                trainer.evaluator("after", trainer.state.global_step)
        asked = run.stop_requested() or signals.received is not None
        stopped = asked and trainer.state.global_step < trainer.state.max_steps  # else it had finished
        run.write_status(
            state="stopped" if stopped else "completed",
            step=trainer.state.global_step,
            stage=None,
            error=f"stopped by {signals.received} after step {trainer.state.global_step}"
            if stopped and signals.received
            else None,
            hint=f"resume with: sdft-lite train {run.recipe} --resume" if stopped else None,
            wall_seconds=round(time.time() - start, 1),
        )
        log.info(
            "run %s %s at step %d", run.name, "stopped" if stopped else "completed", trainer.state.global_step
        )
        return run
    except BaseException as e:
        from .errors import describe_failure

        error, hint = describe_failure(e)
        if isinstance(e, KeyboardInterrupt) and signals.received:
            error = f"interrupted by {signals.received}"
        state = "stopped" if isinstance(e, KeyboardInterrupt) else "failed"
        run.write_status(
            state=state, error=error, hint=hint, stage=None, wall_seconds=round(time.time() - start, 1)
        )
        log.error("run %s: %s", state, error, exc_info=not is_user_error(e))
        raise
    finally:
        _detach_log_file(handler)


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP (Ctrl-C, `timeout`, a closed terminal, a scheduler's preemption)
    during training: the first one stops the run after its current step, with a checkpoint and
    the adapter saved (state `stopped`); before training starts, or a second time, it interrupts
    at once (KeyboardInterrupt, state `stopped`). Installed only in the main thread, where Python
    delivers signals; the earlier handlers come back on exit."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

    def __init__(self):
        self.received: str | None = None
        self.training = False
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set from C
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        first = self.received is None
        self.received = signal.Signals(signum).name
        if first and self.training:
            # os.write, not print or logging: a handler that writes to a buffered stream the
            # interrupted code was writing to raises "reentrant call" (RunCallback logs it).
            os.write(
                2,
                f"\n{self.received}: stopping after the current step and saving (again to stop at once)\n".encode(),
            )
            return
        raise KeyboardInterrupt(self.received)


@dataclass
class Checked:
    """What `preflight` read, handed on so it is not read twice."""

    data: object
    eval_sets: list
    checkpoint: Path | None


def preflight(recipe: Recipe, run: RunFolder) -> Checked:
    """Every check that needs no model weights, before the run folder is created, replaced or
    written: the run name and folder state, the data and probe files, the model's config and
    tokenizer, and every training row's prompt length."""
    from .data import load_data
    from .evaluate import eval_sets_from_recipe
    from .prompts import PromptEncoder

    checkpoint = check_run_folder(recipe, run)
    data = load_data(recipe.data)
    eval_sets = eval_sets_from_recipe(recipe, data.eval)
    encode_train(PromptEncoder(check_model(recipe), recipe.data), recipe, data)
    return Checked(data, eval_sets, checkpoint)


def encode_train(encoder, recipe: Recipe, data) -> list:
    """The training rows encoded, with the bad-row policy applied to prompts that are too long
    (a check that needs the tokenizer)."""
    from .data import handle_bad_rows

    encoded, bad = encoder.encode(data.train)
    handle_bad_rows(
        encoded,
        bad,
        total=len(data.train),
        on_bad_row=recipe.data.on_bad_row,
        split="train",
        where=f"data.source {recipe.data.source}",
    )
    return encoded


def check_run_folder(recipe: Recipe, run: RunFolder) -> Path | None:
    """Whether output.if_exists may act on this run folder now; the checkpoint to resume from."""
    problem = run_name_problem(run.name)
    if problem:
        raise RecipeError([f"output.name: {problem}"])
    out = Path(recipe.output.dir)
    for path, what in ((out, "output.dir"), (run.path, "the run folder")):
        if path.exists() and not path.is_dir():
            raise RecipeError([f"{what} {path} is a file, not a folder: set output.dir to a folder"])
    mode, name = recipe.output.if_exists, run.name
    if not run.exists():
        if mode == "resume":
            others = [r.name for r in list_runs(out)]
            raise RunExistsError(
                f"there is no run '{name}' in {out} to resume"
                + (f" (runs there: {', '.join(sorted(others)[:10])})" if others else "")
                + ": check the name, or drop --resume to start a new run"
            )
        return None
    status = run.read_status()
    state = status.get("state")
    if status.get("pid") == os.getpid():
        state = "queued"  # the app wrote our own pid when it started us for its queued run
    elif state in ("running", "queued") and status.get("pid") and run.process_alive(status):
        # `queued` with a live pid: the app's child, still starting up on this run folder.
        raise RunExistsError(
            f"run '{name}' is still training (pid {status.get('pid')}): stop it first with "
            f"`sdft-lite stop {name} --runs-dir {out}`, or pick another output.name"
        )
    if mode == "error":
        raise RunExistsError(
            f"run folder {run.path} already exists. Pick another output.name, or pass --resume "
            f"(output.if_exists=resume) to continue it, or --overwrite (output.if_exists=overwrite) to replace it."
        )
    if mode == "overwrite":
        if not (run.status_file.exists() or run.recipe.exists()):
            raise RunExistsError(
                f"{run.path} is not a run folder (no status.json or recipe.yaml): it is not deleted; "
                "pick another output.name or output.dir"
            )
        return None
    ckpt = run.last_checkpoint()
    if ckpt is None and state != "queued":  # queued: the app's new run, started with --resume
        raise RunExistsError(
            f"run '{name}' has no checkpoint to resume from (state: {state}): start it again with "
            "--overwrite (its files are replaced)"
        )
    step = status.get("step") or 0
    if state == "completed" and not (recipe.train.max_steps and recipe.train.max_steps > step):
        raise RunExistsError(
            f"run '{name}' is already completed (step {step}): to train it further, resume with a larger "
            f"train.max_steps (e.g. train.max_steps={2 * step or 1}); to start again, --overwrite"
        )
    return ckpt


def check_model(recipe: Recipe):
    """The model's (and a separate teacher's) config and tokenizer load, and the LoRA target
    modules exist in it, all without weights; returns the tokenizer, for the prompt lengths."""
    if recipe.teacher.model:
        _load_config("teacher.model", recipe.teacher.model, recipe.model)
    from .models import check_target_modules_from_config, load_tokenizer, resolve_model_name

    config = _load_config("model.name", recipe.model.name, recipe.model)
    check_target_modules_from_config(config, recipe.model)
    return load_tokenizer(resolve_model_name(recipe.model.name), recipe.model)


def _load_config(key: str, value: str, cfg):
    from transformers import AutoConfig

    from .models import check_model_source, load_error, resolve_model_name

    name = resolve_model_name(value)
    check_model_source(key, name)
    try:
        return AutoConfig.from_pretrained(
            name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise load_error(key, name, e) from None


def _truncate_metrics(run: RunFolder, step: int) -> None:
    """On resume, drop records logged after the checkpoint: they will be logged again."""
    import json

    from .runs import read_jsonl

    for path in (run.metrics, run.samples):
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


def mmap_threshold_bytes(recipe: Recipe, vocab_size: int) -> int:
    """Allocations at or above this size get their own mmap, so freeing them returns the memory.

    Below it sit the per-token rollout tensors that remain ([batch * generations, vocab] fp32,
    e.g. of top-k / top-p warping; the head's logits and the sampler's probabilities have buffers
    of their own, see `sampling.decode_head`): served from the heap they are reused in place,
    instead of paying a fresh mmap and its page faults each time (measured, when the logits and
    probabilities were allocated per token: ~15 % of a CPU step at vocab 152k). Above it sit the
    loss's buffers (tens of MiB per [rows, vocab] chunk; the vocabulary tiles of an fp32 head, a
    few MiB each, for batches up to a few rows), which the heap would keep resident after the loss.
    """
    from .losses import _FP32_BYTES, LossSpec, rows_per_chunk

    spec = LossSpec.from_config(recipe.loss)
    chunk_tensor = rows_per_chunk(vocab_size, spec) * vocab_size * _FP32_BYTES
    decode_tensor = recipe.train.batch_size * recipe.generation.num_generations * vocab_size * _FP32_BYTES
    return max(1 << 20, min(decode_tensor + (1 << 20), chunk_tensor // 2))


def _glibc():
    """The process's libc.so.6 (ctypes handle) on Linux, else None (macOS, Windows)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # e.g. musl: nothing to tune
        return None
    return libc


def return_freed_memory_to_os(threshold: int = 1 << 20) -> None:
    """CPU training: serve large allocations with mmap so freed tensors leave the process.

    glibc keeps freed heap blocks for reuse; the loss allocates and frees [rows, vocab] chunks
    tens of MiB each, so without this the resident size grows to many times what is live
    (measured: 2.2 GB resident for 65 MiB live at vocab 152k x 1k tokens).
    """
    libc = _glibc()
    if libc is not None:
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, int(threshold))


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc malloc_trim), e.g. after loading: the
    tokenizer and the model loader leave tens of MiB freed but resident (measured: 36 MiB for a
    152k-token tokenizer)."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # not glibc: nothing to trim
        libc.malloc_trim(0)


def build_trainer(
    recipe: Recipe,
    run: RunFolder,
    recipe_yaml: str | None = None,
    checked: Checked | None = None,
    signals: StopSignals | None = None,
):
    """Data -> model -> prompts -> teacher -> SDFTTrainer, ready for .train()."""
    from .backends import activate_backend, load_student_for

    # First: with backend unsloth this imports Unsloth, which must precede transformers/peft/trl.
    backend = activate_backend(recipe.model)
    import torch
    from transformers import ProgressCallback, TrainingArguments

    from .assess import Evaluator
    from .data import load_data
    from .evaluate import eval_sets_from_recipe
    from .models import load_frozen
    from .prompts import PromptEncoder
    from .teacher import Teacher
    from .trainer import BarProgress, EvalCallback, RunCallback, SDFTTrainer

    if checked is not None:
        data, eval_sets = checked.data, checked.eval_sets
    else:
        data = load_data(recipe.data)
        eval_sets = eval_sets_from_recipe(recipe, data.eval)  # checks probe files before the model loads
    run.write_status(stage="loading model")
    loaded = load_student_for(recipe.model, recipe.train.gradient_checkpointing, recipe.train.seed, backend)
    if loaded.device.type == "cpu":
        vocab = loaded.model.get_output_embeddings().weight.shape[0]
        return_freed_memory_to_os(mmap_threshold_bytes(recipe, vocab))
    encoder = PromptEncoder(loaded.tokenizer, recipe.data)
    # Again with the loaded model's tokenizer (a backend may return its own): the same check.
    encoded = encode_train(encoder, recipe, data)
    truncated = sum(e.demo_truncated for e in encoded)
    if truncated:
        log.warning("%d demonstrations were truncated to fit data.max_teacher_prompt_tokens", truncated)

    teacher = None
    if recipe.method.name == "sdft":
        external = (
            load_frozen(recipe.teacher.model, recipe.model, loaded.device, loaded.dtype)
            if recipe.teacher.model
            else None
        )
        teacher = Teacher(
            loaded.model, recipe.teacher.kind, recipe.teacher.ema_rate, recipe.teacher.sync_steps, external
        )

    t = recipe.train
    use_cuda = loaded.device.type == "cuda"
    args = TrainingArguments(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        max_steps=t.max_steps or -1,
        num_train_epochs=t.num_epochs,
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=[] if t.report_to == ["none"] else list(t.report_to),
        remove_unused_columns=False,
        gradient_checkpointing=False,  # enabled on the model at load time
        bf16=use_cuda and loaded.dtype == torch.bfloat16,
        fp16=use_cuda and loaded.dtype == torch.float16,
        use_cpu=not use_cuda,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    evaluator = Evaluator(
        loaded.model, loaded.tokenizer, encoder, eval_sets, loaded.eos_ids, loaded.pad_id, recipe.eval, run
    )
    callbacks = [RunCallback(run, teacher, signals)]
    if t.eval_steps and eval_sets:
        callbacks.append(EvalCallback(evaluator, t.eval_steps))
    trainer = SDFTTrainer(
        model=loaded.model,
        args=args,
        train_dataset=encoded,
        recipe=recipe,
        teacher=teacher,
        run=run,
        eos_ids=loaded.eos_ids,
        pad_id=loaded.pad_id,
        tokenizer=loaded.tokenizer,
        encoder=encoder,
        callbacks=callbacks,
        recipe_yaml=recipe_yaml or dump_recipe(recipe),
    )
    trainer.evaluator = evaluator
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(BarProgress)
    if loaded.device.type == "cpu":
        trim_heap()
    return trainer


def save_adapter(model, tokenizer, run: RunFolder) -> None:
    """Write the student adapter to adapter/ via a temp folder, so adapter/ is always complete."""
    from .models import STUDENT_ADAPTER

    tmp = run.path / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), selected_adapters=[STUDENT_ADAPTER])
    tokenizer.save_pretrained(str(tmp))
    old = run.path / ".adapter.old"
    with _signals_held():  # the two renames are never split by Ctrl-C or a cancel
        if run.adapter.exists():
            run.adapter.rename(old)
        tmp.rename(run.adapter)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _signals_held():
    """Delivery of StopSignals' signals deferred to the end of the block (main thread, POSIX)."""
    sigmask = getattr(signal, "pthread_sigmask", None)
    held = set(StopSignals.SIGNALS)
    if sigmask is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        sigmask(signal.SIG_SETMASK, previous)

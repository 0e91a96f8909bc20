"""One `transformers.Trainer` subclass: an SDFT step (rollout -> teacher -> chunked loss) or an
SFT step, plus the callbacks that keep the run folder current.

Gradient accumulation, schedulers, checkpoints, resume, report_to and the progress bar are the
Trainer's own; this file adds only what self-distillation needs.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import ProgressCallback, TrainerCallback

from .config import Recipe
from .errors import UserError
from .hf_trainer import Trainer
from .losses import LossSpec, aggregate_loss, chunked_distillation_loss
from .memory import peak_rss_mib
from .models import decoder_hidden_states, output_head
from .prompts import EncodedExample, PromptEncoder, left_pad, right_pad
from .rollout import (
    completion_hidden,
    concat_prompt_completion,
    generate_rollouts,
    loss_mask,
)
from .runs import RunFolder, append_jsonl
from .teacher import Teacher

if TYPE_CHECKING:
    from .assess import Evaluator
    from .train import StopSignals

log = logging.getLogger(__name__)
SAMPLES_PER_WRITE = 2
SAMPLE_TOKENS = 64


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU; elsewhere this process's own peak RSS (not the peak
    of the process that started it, e.g. the app: see `memory`)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


class Collator:
    """Pads student and teacher prompts on the left; keeps the examples for logging."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[EncodedExample]) -> dict:
        s_ids, s_mask = left_pad([e.student_ids for e in examples], self.pad_id)
        t_ids, t_mask = left_pad([e.teacher_ids for e in examples], self.pad_id)
        return {
            "student_ids": s_ids,
            "student_mask": s_mask,
            "teacher_ids": t_ids,
            "teacher_mask": t_mask,
            "examples": examples,
        }


class SDFTTrainer(Trainer):
    def __init__(
        self,
        *,
        recipe: Recipe,
        teacher: Teacher | None,
        run: RunFolder,
        eos_ids: list[int],
        pad_id: int,
        tokenizer,
        encoder: PromptEncoder | None = None,
        recipe_yaml: str = "",
        **kwargs,
    ):
        super().__init__(processing_class=tokenizer, data_collator=Collator(pad_id), **kwargs)
        self.recipe_yaml = recipe_yaml
        self.recipe = recipe
        self.encoder = encoder or PromptEncoder(tokenizer, recipe.data)
        self.teacher = teacher
        self.run = run
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.spec = LossSpec.from_config(recipe.loss)
        # Our loss is already a per-micro-batch mean: let Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._last_log_time = time.perf_counter()
        self._last_log_step = 0
        self._sampled_step = -1
        self._skip_update = False  # a micro-batch of this optimizer step had a non-finite loss
        self.skipped_steps = run.read_status(raw=True).get("skipped_steps") or 0  # kept on resume

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.recipe.method.name == "sft":
            loss = self._sft_loss(model, inputs)
        else:
            loss = self._sdft_loss(model, inputs)
        if not torch.isfinite(loss.detach()):
            self._non_finite("loss", loss.item())
            # A zero loss on the trainable weights keeps backward valid; the step is dropped in
            # `_clip_grad_norm`, before the optimizer sees it.
            loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
        return (loss, None) if return_outputs else loss

    # ------------------------------------------------------------------ divergence
    def _non_finite(self, what: str, value: float) -> None:
        """A NaN/inf loss or gradient: the run fails (train.on_nonfinite: stop), or this
        optimizer step's update is dropped and counted (skip)."""
        step = self.state.global_step + 1
        if self.recipe.train.on_nonfinite == "stop":
            raise DivergedError(
                f"training diverged: the {what} is {value} at step {step}",
                hint=(
                    f"lower train.learning_rate (now {self.recipe.train.learning_rate:g}), check the data, or "
                    "set train.on_nonfinite: skip to drop such steps; earlier checkpoints are kept"
                ),
            )
        log.warning("non-finite %s (%s) at step %d: this step's update is skipped", what, value, step)
        self._skip_update = True

    def _clip_grad_norm(self, model):
        norm = super()._clip_grad_norm(model)
        value = float(norm)
        # Under fp16 loss scaling an infinite norm is an overflow that the scaler handles itself
        # (it skips the step and lowers the scale), not a divergence.
        scaled = getattr(self.accelerator, "scaler", None) is not None
        if not self._skip_update and not scaled and not torch.isfinite(torch.tensor(value)):
            self._non_finite("gradient norm", value)
        if self._skip_update:
            model.zero_grad(set_to_none=True)  # the optimizer skips weights without a gradient
            self._skip_update = False
            self.skipped_steps += 1
            self.run.write_status(skipped_steps=self.skipped_steps)
            return torch.tensor(0.0)
        return norm

    # ------------------------------------------------------------------ checkpoints
    def _get_output_dir(self, trial) -> str:
        return str(self._staging) if getattr(self, "_staging", None) else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written in a staging folder with our files (recipe, EMA shadow)
        and renamed into checkpoints/ only when complete: an interrupted save leaves the previous
        checkpoints as they were, and `RunFolder.last_checkpoint` never sees a partial one."""
        final_root = Path(self.args.output_dir)
        self._staging = final_root / ".staging"
        shutil.rmtree(self._staging, ignore_errors=True)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            staging, self._staging = self._staging, None
        name = f"checkpoint-{self.state.global_step}"
        ckpt = staging / name
        (ckpt / "recipe.yaml").write_text(self.recipe_yaml, encoding="utf-8")
        if self.teacher is not None and self.teacher.shadow:
            torch.save(self.teacher.state_dict(), ckpt / "ema_shadow.pt")
        target = final_root / name
        if target.exists():  # the same step saved again (a resume at a checkpoint's step)
            old = final_root / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            os.replace(ckpt, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(ckpt, target)
        shutil.rmtree(staging, ignore_errors=True)
        self._rotate(final_root)

    def _rotate(self, root: Path) -> None:
        """Keep the newest `save_total_limit` checkpoints (Trainer's rotation ran in the staging folder)."""
        limit = self.args.save_total_limit
        if not limit:
            return
        done = sorted(  # complete ones only, as `RunFolder.last_checkpoint` counts them
            (
                p
                for p in root.glob("checkpoint-*")
                if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
            ),
            key=lambda p: int(p.name.split("-")[-1]),
        )
        for old in done[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _record_paths(self, model, inputs) -> None:
        """Which rollout paths this run takes (fixed rules of the CPU, the model and the recipe,
        see `sampling.rollout_paths`), written once to train.log and status.json."""
        from .sampling import rollout_paths

        gen = self.recipe.generation
        paths = {"device": model.device.type, "generation_engine": gen.engine}
        if gen.engine == "sdft":
            rows = inputs["student_ids"].shape[0] * gen.num_generations
            paths.update(
                rollout_paths(
                    model,
                    rows,
                    inputs["student_ids"].shape[1] + gen.max_new_tokens,
                    logprobs=self.spec.is_clip is not None,
                    top_k=gen.top_k,
                    top_p=gen.top_p,
                )
            )
        log.info("paths: %s", ", ".join(f"{k}={v}" for k, v in paths.items()))
        self.run.write_status(paths=paths)
        self._paths_recorded = True

    def _sdft_loss(self, model, inputs) -> torch.Tensor:
        g = self.recipe.generation.num_generations
        if not getattr(self, "_paths_recorded", False):
            self._record_paths(model, inputs)
        start = time.perf_counter()
        roll = generate_rollouts(
            model,
            inputs["student_ids"],
            inputs["student_mask"],
            self.recipe.generation,
            self.eos_ids,
            self.pad_id,
            record_logprobs=self.spec.is_clip is not None,
            num_samples=g,
        )
        s_ids, s_mask = (
            inputs["student_ids"].repeat_interleave(g, 0),
            inputs["student_mask"].repeat_interleave(g, 0),
        )
        t_ids, t_mask = (
            inputs["teacher_ids"].repeat_interleave(g, 0),
            inputs["teacher_mask"].repeat_interleave(g, 0),
        )
        gen_seconds = time.perf_counter() - start
        T = roll.completion_ids.shape[1]
        keep = loss_mask(roll.completion_mask, self.recipe.loss.skip_first_tokens)
        targets = roll.completion_ids[keep]

        # Teacher: teacher prompt + the student's exact completion ids, no grad.
        full, mask, width = concat_prompt_completion(t_ids, t_mask, roll.completion_ids, roll.completion_mask)
        teacher_h = completion_hidden(self.teacher.hidden_states(full, mask), width, T)[keep]

        # Student: plain prompt + the same completion, with grad.
        full, mask, width = concat_prompt_completion(s_ids, s_mask, roll.completion_ids, roll.completion_mask)
        student_h = completion_hidden(decoder_hidden_states(model, full, mask), width, T)[keep]

        out = chunked_distillation_loss(
            student_h,
            teacher_h,
            output_head(model),
            self.teacher.head(),
            targets,
            self.spec,
            old_logprobs=roll.logprobs[keep] if roll.logprobs is not None else None,
            frozen_head=not any(p.requires_grad for p in model.get_output_embeddings().parameters()),
        )
        rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
        loss = aggregate_loss(out.per_token_loss, rows, keep.shape[0])

        n_tokens = int(roll.lengths.sum())
        self._record(
            kl=out.per_token_loss.detach().mean().item() if len(targets) else 0.0,
            completion_length=roll.lengths.float().mean().item(),
            clipped_fraction=roll.clipped.float().mean().item(),
            teacher_minus_student_logprob=(out.teacher_logprobs - out.student_logprobs).mean().item()
            if len(targets)
            else 0.0,
            loss_tokens=float(len(targets)),
            generated_tokens=float(n_tokens),
            generation_seconds=gen_seconds,
        )
        self._maybe_write_samples(inputs["examples"], roll, keep, out, g)
        return loss

    def _sft_loss(self, model, inputs) -> torch.Tensor:
        """Cross-entropy on the demonstration tokens only (prompt tokens carry no loss)."""
        demos = [self.encoder.completion_ids(e.demonstration, self.eos_ids) for e in inputs["examples"]]
        limit = self.recipe.generation.max_new_tokens
        demos = [d[:limit] for d in demos]
        c_ids, c_mask = right_pad(demos, self.pad_id)
        c_ids, c_mask = c_ids.to(inputs["student_ids"].device), c_mask.to(inputs["student_ids"].device)
        full, mask, width = concat_prompt_completion(
            inputs["student_ids"], inputs["student_mask"], c_ids, c_mask
        )
        hidden = completion_hidden(decoder_hidden_states(model, full, mask), width, c_ids.shape[1])[
            c_mask.bool()
        ]
        per_token = sft_token_loss(hidden, output_head(model), c_ids[c_mask.bool()], self.spec)
        rows = torch.arange(c_ids.shape[0], device=c_ids.device)[:, None].expand_as(c_mask)[c_mask.bool()]
        loss = aggregate_loss(per_token, rows, c_ids.shape[0])
        self._record(
            kl=0.0, completion_length=c_mask.sum(1).float().mean().item(), loss_tokens=float(len(per_token))
        )
        return loss

    # ------------------------------------------------------------------ logging
    def _record(self, **values: float) -> None:
        for k, v in values.items():
            self._metrics[k].append(v)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:  # a training log, not the end-of-train summary
            m = self._metrics
            for k in ("kl", "completion_length", "clipped_fraction", "teacher_minus_student_logprob"):
                if m.get(k):
                    logs[k] = sum(m[k]) / len(m[k])
            now, step = time.perf_counter(), self.state.global_step
            steps = max(1, step - self._last_log_step)
            logs["seconds_per_step"] = (now - self._last_log_time) / steps
            if m.get("generation_seconds"):
                logs["generated_tokens_per_s"] = sum(m["generated_tokens"]) / max(
                    1e-9, sum(m["generation_seconds"])
                )
                logs["tokens_per_s"] = sum(m["generated_tokens"]) / max(1e-9, now - self._last_log_time)
            logs["peak_memory_mb"] = peak_memory_mb(self.args.device)
            if self.skipped_steps:
                logs["skipped_steps"] = self.skipped_steps
            self._last_log_time, self._last_log_step = now, step
            self._metrics.clear()
        super().log(logs, start_time)

    def _maybe_write_samples(self, examples, roll, keep, out, g: int) -> None:
        step = self.state.global_step
        if step % self.recipe.train.sample_steps or step == self._sampled_step:
            return
        self._sampled_step = step
        tok = self.processing_class
        # Split the flat per-token log-probs back into rows.
        counts = keep.sum(1).tolist()
        s_rows = torch.split(out.student_logprobs, counts)
        t_rows = torch.split(out.teacher_logprobs, counts)
        for i in range(min(SAMPLES_PER_WRITE, keep.shape[0])):
            ex = examples[i // g]
            ids = roll.completion_ids[i, : int(roll.lengths[i])].tolist()
            s, t = s_rows[i], t_rows[i]
            append_jsonl(
                self.run.samples,
                {
                    "step": step,
                    "row": ex.row,
                    "prompt": ex.prompt_text,
                    "completion": tok.decode(ids, skip_special_tokens=True),
                    "demonstration": ex.demonstration,
                    "completion_tokens": len(ids),
                    "clipped": bool(roll.clipped[i]),
                    "student_logprob_mean": s.mean().item() if len(s) else None,
                    "teacher_logprob_mean": t.mean().item() if len(t) else None,
                    "tokens": [
                        {"token": tok.decode([tid]), "student": round(a, 4), "teacher": round(b, 4)}
                        for tid, a, b in zip(
                            ids[self.recipe.loss.skip_first_tokens :][:SAMPLE_TOKENS],
                            s.tolist()[:SAMPLE_TOKENS],
                            t.tolist()[:SAMPLE_TOKENS],
                            strict=False,
                        )
                    ],
                },
            )


def sft_token_loss(hidden: torch.Tensor, head, targets: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Per-token cross-entropy in row chunks (same memory bound as the distillation loss)."""
    from torch.utils.checkpoint import checkpoint

    from .losses import rows_per_chunk

    if hidden.shape[0] == 0:
        return hidden.sum(-1)
    vocab = head(hidden[:1]).shape[-1]
    step = rows_per_chunk(vocab, spec)

    def chunk_loss(h, y):
        return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="none")

    parts = [
        checkpoint(chunk_loss, hidden[i : i + step], targets[i : i + step], use_reentrant=False)
        for i in range(0, hidden.shape[0], step)
    ]
    return torch.cat(parts)


class BarProgress(ProgressCallback):
    """The progress bar with the latest loss, kl and tokens/s on it, instead of one printed dict per
    logging step (every value is in metrics.jsonl)."""

    SHOWN = {"loss": "loss", "kl": "kl", "completion_length": "len", "tokens_per_s": "tok/s"}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or not logs or "loss" not in logs:
            return
        self.training_bar.set_postfix(
            {
                short: f"{logs[k]:.4g}"
                for k, short in self.SHOWN.items()
                if isinstance(logs.get(k), int | float)
            },
            refresh=False,
        )


class DivergedError(UserError):
    """A non-finite loss or gradient with train.on_nonfinite: stop."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


class RunCallback(TrainerCallback):
    """Keeps status.json / metrics.jsonl current, updates the EMA teacher, honours stop requests
    (the STOP file, or a signal caught by `train.StopSignals`)."""

    def __init__(self, run: RunFolder, teacher: Teacher | None, signals: StopSignals | None = None):
        self.run = run
        self.teacher = teacher
        self.signals = signals
        self.stopped = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.run.write_status(state="running", step=state.global_step, total_steps=state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self.teacher is not None:
            self.teacher.update(state.global_step)
        self.run.write_status(state="running", step=state.global_step, total_steps=state.max_steps)
        signalled = self.signals is not None and self.signals.received is not None
        if (signalled or self.run.stop_requested()) and not self.stopped:
            why = self.signals.received if signalled else "stop requested"
            log.info("%s: stopping after step %d and saving", why, state.global_step)
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": time.time()}
            record.update({("lr" if k == "learning_rate" else k): v for k, v in logs.items()})
            append_jsonl(self.run.metrics, record)


class EvalCallback(TrainerCallback):
    """Evaluates every `train.eval_steps` optimizer steps."""

    def __init__(self, evaluator: Evaluator, every: int):
        self.evaluator, self.every = evaluator, every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self.evaluator("step", state.global_step)

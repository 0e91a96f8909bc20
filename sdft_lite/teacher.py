"""The teacher: the same network as the student, seen through a different adapter state.

- base: the student's adapter disabled (PEFT `disable_adapter()`), i.e. the frozen initial model.
- live: the student itself, in eval mode and without gradients.
- ema:  a second LoRA adapter ("ema") of the same shape, frozen, holding an exponential moving
        average of the student's adapter. Its float32 shadow is the source of truth (a 0.01
        update vanishes in bf16) and starts from the student's initial adapter. A and B are
        averaged separately (the average of B@A products is not itself low-rank).
- external (teacher.model): a separate frozen model sharing the tokenizer, for research.

None of the self-teachers needs a second copy of the base weights.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .models import STUDENT_ADAPTER, decoder_hidden_states, output_head

log = logging.getLogger(__name__)
EMA_ADAPTER = "ema"


class Teacher:
    def __init__(
        self,
        model: nn.Module,
        kind: str,
        ema_rate: float = 0.01,
        sync_steps: int = 1,
        external: nn.Module | None = None,
    ):
        self.model = model
        self.kind = kind
        self.ema_rate = ema_rate
        self.sync_steps = sync_steps
        self.external = external
        self.shadow: dict[str, torch.Tensor] = {}
        if kind == "ema" and external is None:
            self._init_ema()

    # ------------------------------------------------------------------ ema
    def _pairs(self):
        """(student param, ema param, shadow key) for every LoRA tensor."""
        params = dict(self.model.named_parameters())
        tag = f".{STUDENT_ADAPTER}."
        for name, p in params.items():
            if tag in name and "lora_" in name:
                ema_name = name.replace(tag, f".{EMA_ADAPTER}.")
                yield p, params[ema_name], ema_name

    def _init_ema(self) -> None:
        peft_config = self.model.peft_config[STUDENT_ADAPTER]
        self.model.add_adapter(EMA_ADAPTER, peft_config)
        # add_adapter may leave the new adapter active or trainable: make the student active again.
        self.model.base_model.set_adapter(STUDENT_ADAPTER)
        with torch.no_grad():
            for student, ema, key in self._pairs():
                ema.requires_grad_(False)
                self.shadow[key] = student.detach().float().clone()
                ema.copy_(self.shadow[key])
        if not self.shadow:
            raise RuntimeError("EMA teacher found no LoRA parameters to average")

    @torch.no_grad()
    def update(self, optimizer_step: int) -> None:
        """teacher <- (1 - rate) * teacher + rate * student, every `sync_steps` optimizer steps."""
        if self.kind != "ema" or self.external is not None or optimizer_step % self.sync_steps:
            return
        for student, ema, key in self._pairs():
            self.shadow[key].lerp_(student.detach().float(), self.ema_rate)
            ema.copy_(self.shadow[key])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        for _, ema, key in self._pairs():
            self.shadow[key] = state[key].float().to(ema.device).clone()
            ema.copy_(self.shadow[key])

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def _active(self):
        if self.kind == "base":
            with self.model.disable_adapter():
                yield
        elif self.kind == "ema":
            self.model.base_model.set_adapter(EMA_ADAPTER)
            try:
                yield
            finally:
                # Re-activating the student also restores requires_grad: True for it, False for ema.
                self.model.base_model.set_adapter(STUDENT_ADAPTER)
        else:
            yield

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Teacher's final hidden states [B, L, H], eval mode (dropout off), no grad."""
        net = self.external if self.external is not None else self.model
        was_training = net.training
        net.eval()
        try:
            with self._active() if self.external is None else contextlib.nullcontext():
                return decoder_hidden_states(net, input_ids, attention_mask)
        finally:
            net.train(was_training)

    def head(self):
        return output_head(self.external if self.external is not None else self.model)

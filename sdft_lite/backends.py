"""Which backend loads and runs the student: `hf` (transformers + PEFT + bitsandbytes, any device)
or `unsloth` (Unsloth's kernels, NVIDIA GPUs), and the dispatch between them.

Unsloth patches transformers, PEFT and TRL when it is imported, so a process that uses it must
import it before them, and a process that does not must never import it. This module therefore
only *looks* for Unsloth (`importlib.util.find_spec`); `activate_backend` imports
`sdft_lite.unsloth_backend` (which imports `unsloth` first) and is meant to be the first thing a
training process does. The arguments handed to Unsloth are built here, by plain functions that
need neither Unsloth nor a GPU, so tests check them anywhere.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .config import ModelConfig
    from .models import LoadedModel

log = logging.getLogger(__name__)

Backend = Literal["hf", "unsloth"]
INSTALL_UNSLOTH = 'pip install "sdft-lite[unsloth]"'
# The names `lora.target_modules: all-linear` stands for under Unsloth: the attention and MLP
# projections of the Llama family (Llama, Mistral, Qwen2/3, Gemma), the set its fused kernels cover.
UNSLOTH_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Attribute set on a model loaded by the Unsloth backend (see `rollout_context`).
BACKEND_ATTR = "_sdft_backend"


class BackendError(Exception):
    """The requested backend cannot run here; the message says what is missing and what to do."""


def unsloth_installed() -> bool:
    """True when the `unsloth` package is installed. Looks, never imports (importing patches transformers)."""
    return importlib.util.find_spec("unsloth") is not None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_backend(requested: str, cuda: bool, unsloth: bool) -> tuple[Backend, str]:
    """The backend for `model.backend: requested` given what this machine has, and why.

    Raises BackendError for `unsloth` when CUDA or the package is missing.
    """
    if requested == "hf":
        return "hf", "model.backend is hf"
    if requested == "auto":
        if cuda and unsloth:
            return "unsloth", "auto: CUDA and unsloth are available"
        missing = " and ".join(
            m for m, ok in (("no CUDA GPU", cuda), ("unsloth not installed", unsloth)) if not ok
        )
        return "hf", f"auto: {missing}"
    if requested != "unsloth":
        raise BackendError(f"model.backend must be auto, hf or unsloth, got '{requested}'")
    problems = []
    if not cuda:
        problems.append(
            "no CUDA GPU is visible to PyTorch (Unsloth's kernels need an NVIDIA GPU and a CUDA build of torch)"
        )
    if not unsloth:
        problems.append(f"the unsloth package is not installed (install it with: {INSTALL_UNSLOTH})")
    if problems:
        raise BackendError(
            "model.backend is 'unsloth' but "
            + "; and ".join(problems)
            + ". Use `model.backend: hf` (or auto) to train with transformers + PEFT instead."
        )
    return "unsloth", "model.backend is unsloth"


def select_backend(cfg: ModelConfig) -> Backend:
    """`auto` -> unsloth when CUDA is available and unsloth is installed, else hf."""
    # Only probe CUDA when the answer depends on it (hf never needs torch.cuda initialised).
    if cfg.backend == "hf":
        backend, reason = "hf", "model.backend is hf"
    else:
        backend, reason = choose_backend(cfg.backend, cuda_available(), unsloth_installed())
    log.info("backend %s (%s)", backend, reason)
    return backend


def activate_backend(cfg: ModelConfig) -> Backend:
    """Select the backend and, for unsloth, import it now, before transformers/peft/trl are imported.

    Call this first in a training process. Importing Unsloth after transformers still works but
    Unsloth warns that some of its patches may not apply.
    """
    backend = select_backend(cfg)
    if backend == "unsloth":
        late = [m for m in ("transformers", "peft", "trl") if m in sys.modules]
        if late and "unsloth" not in sys.modules:
            log.warning(
                "unsloth is imported after %s: some of its optimisations may not apply", ", ".join(late)
            )
        _unsloth_module()
    return backend


def _unsloth_module():
    try:
        return importlib.import_module("sdft_lite.unsloth_backend")
    except ImportError as e:
        raise BackendError(
            f"unsloth is installed but could not be imported ({e}). Reinstall it with {INSTALL_UNSLOTH}, "
            "or use `model.backend: hf`."
        ) from e


def load_student_for(
    cfg: ModelConfig, gradient_checkpointing: bool, seed: int, backend: Backend | None = None
) -> LoadedModel:
    """Base model + fresh LoRA adapter 'default', loaded by `backend` (default: the one the recipe selects)."""
    if (backend or activate_backend(cfg)) == "unsloth":
        return _unsloth_module().load_student(cfg, gradient_checkpointing, seed)
    from .models import load_student

    return load_student(cfg, gradient_checkpointing, seed)


def backend_of(model) -> Backend:
    """Which backend loaded `model` (the Unsloth backend marks its models)."""
    return "unsloth" if getattr(model, BACKEND_ATTR, None) == "unsloth" else "hf"


def rollout_context(model) -> contextlib.AbstractContextManager:
    """Context to wrap student rollouts (generate) in: Unsloth's inference mode, else nothing.

    Unsloth's generate only switches back to training (and re-arms gradient checkpointing) when
    the model was in training mode when generate was called; our rollout puts the model in eval
    mode first, so the Unsloth backend restores training mode itself after the rollout.
    """
    if backend_of(model) == "unsloth":
        return _unsloth_module().inference_mode(model)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- Unsloth arguments
# Plain functions (no Unsloth, no torch, no GPU): unsloth_backend passes their results on as they are.


def expand_target_modules(target_modules: list[str] | str, present: set[str] | None = None) -> list[str]:
    """`all-linear` -> the attention and MLP projection names; a list stays as given (deduplicated).

    With `present` (the model's linear layer leaf names): `all-linear` keeps those the model has;
    a list must name only modules the model has. Otherwise BackendError naming the missing ones
    and the linear layers there are.
    """
    explicit = target_modules != "all-linear"
    names = list(dict.fromkeys(target_modules)) if explicit else list(UNSLOTH_LINEAR_MODULES)
    if present is not None:
        kept = [n for n in names if n in present]
        missing = [n for n in names if n not in present]
        if not kept or (explicit and missing):
            raise BackendError(
                f"model.lora.target_modules: {missing} match no module of this model. Its linear layers "
                f"are {sorted(present)}: list some of those, or use target_modules: all-linear"
            )
        names = kept
    return names


def unsloth_dtype_name(dtype: str) -> str | None:
    """model.dtype -> Unsloth's `dtype`: None lets Unsloth pick (bfloat16 at compute capability 8.0
    and above, else float16: `models.choose_dtype`'s rule). Unsloth loads float16 for an explicit
    bfloat16 below 8.0 too, so the backend reads the dtype back from the loaded model."""
    return None if dtype == "auto" else dtype


def unsloth_gradient_checkpointing(enabled: bool) -> str | bool:
    """'unsloth' = Unsloth's checkpointing, which offloads the saved layer inputs to CPU memory."""
    return "unsloth" if enabled else False


def unsloth_load_kwargs(cfg: ModelConfig, model_name: str, gradient_checkpointing: bool) -> dict[str, Any]:
    """Keyword arguments for `FastLanguageModel.from_pretrained` (dtype as a name; see unsloth_backend).

    `use_exact_model_name`: Unsloth otherwise swaps a Hub id for its own pre-quantized repo
    (e.g. `...-bnb-4bit`, a download and different weights from what the hf backend loads) and,
    for ids it does not know, fetches its name tables from the network. The model the recipe
    names is the model trained; name a `-bnb-4bit` repo to use Unsloth's pre-quantized weights.
    """
    return dict(
        model_name=model_name,
        max_seq_length=cfg.max_seq_length,
        dtype=unsloth_dtype_name(cfg.dtype),
        load_in_4bit=cfg.load_in_4bit,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        use_gradient_checkpointing=unsloth_gradient_checkpointing(gradient_checkpointing),
        use_exact_model_name=True,
    )


def unsloth_peft_kwargs(
    cfg: ModelConfig, gradient_checkpointing: bool, seed: int, present: set[str] | None = None
) -> dict[str, Any]:
    """Keyword arguments for `FastLanguageModel.get_peft_model`.

    bias 'none' and dropout 0 (the recipe default) keep Unsloth's fused LoRA kernels in use;
    other values work but run PEFT's slower per-layer path.
    """
    return dict(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=expand_target_modules(cfg.lora.target_modules, present),
        bias="none",
        use_gradient_checkpointing=unsloth_gradient_checkpointing(gradient_checkpointing),
        random_state=seed,
    )

"""The `unsloth` backend: the student loaded by Unsloth's FastLanguageModel (fused LoRA kernels,
4-bit, offloaded gradient checkpointing), behind the same small interface as `models.py`.

`import unsloth` comes first, before anything that imports transformers, PEFT or TRL: Unsloth
patches those libraries when it is imported, so a process that uses it imports it before them,
and a process that does not use it never imports it. Nothing imports this module at the top
level; `backends.activate_backend` imports it only when the recipe selects Unsloth.

What the rest of sdft-lite relies on, and how it holds under Unsloth (llama.py = unsloth/models/llama.py):
- The student is a `peft.PeftModel` with adapter 'default', so the teachers work unchanged:
  `disable_adapter()` (base teacher) and `add_adapter` + `set_adapter` (EMA teacher). Unsloth's
  fused LoRA kernels read the adapter state per call (`get_lora_parameters` in
  unsloth/kernels/utils.py): disabled adapters give the base weights, and only the single active
  adapter is used (more than one active adapter raises).
- Hidden states: the trainer calls the decoder (`model.model`) directly, without logits. Unsloth's
  decoder forward (`LlamaModel_fast_forward`, llama.py) drops the attention mask in training mode
  (it assumes right padding) unless the decoder carries `_unsloth_keep_padding_mask`; our prompts
  are left-padded, so `load_student` sets that flag, as Unsloth does itself for TRL's
  distillation trainers (`_wrap_distillation_padding_mask`, unsloth/models/rl.py). A decoder
  called directly also keeps its final-norm output buffer (`_unsloth_head_reads_final_norm` stays
  off), which is what a caller that owns the hidden states' gradient needs.
- Rollouts: Unsloth's `generate` turns off gradient checkpointing (`for_inference`) and restores
  it only if the model was in training mode when generate was called (`unsloth_fast_generate`,
  llama.py). Our rollout switches to eval mode first, so `inference_mode` below restores the
  mode and re-arms checkpointing afterwards. Rollouts go through `generate`, not the built-in
  sampling loop (generation.engine: sdft): Unsloth's forward turns a transformers cache into
  tuples (`_cache_as_legacy_tuple`) and returns tuples, which that loop cannot copy per sample.
"""

import unsloth  # noqa: F401, I001  (must precede transformers/peft/trl: it patches them on import)
from unsloth import FastLanguageModel

import contextlib
import logging
from pathlib import Path

import torch

from .backends import BACKEND_ATTR, unsloth_load_kwargs, unsloth_peft_kwargs
from .config import ModelConfig
from .models import (
    STUDENT_ADAPTER,
    LoadedModel,
    ModelLoadError,
    causal_lm,
    eos_token_ids,
    pick_dtype,
    resolve_model_name,
)

log = logging.getLogger(__name__)
SAVE_KINDS = ("merged_16bit", "gguf")


def load_student(cfg: ModelConfig, gradient_checkpointing: bool, seed: int) -> LoadedModel:
    """Base model (4-bit when asked) + a fresh trainable LoRA adapter 'default', via Unsloth."""
    from peft import PeftModel

    kwargs = unsloth_load_kwargs(cfg, resolve_model_name(cfg.name), gradient_checkpointing)
    if kwargs["dtype"] is not None:
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(**kwargs)
    except OSError as e:
        raise ModelLoadError(
            f"could not load model '{cfg.name}': {e}. Use a local folder, or a Hub id that is cached or reachable."
        ) from None
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    model = FastLanguageModel.get_peft_model(
        model, **unsloth_peft_kwargs(cfg, gradient_checkpointing, seed, present)
    )
    if not isinstance(model, PeftModel) or STUDENT_ADAPTER not in model.peft_config:
        raise ModelLoadError(
            f"Unsloth returned {type(model).__name__} without a LoRA adapter '{STUDENT_ADAPTER}'"
        )
    keep_padding_mask(model)
    setattr(model, BACKEND_ATTR, "unsloth")
    if tokenizer.pad_token_id is None:
        # pad == eos is safe here: every mask is derived from lengths, never from ids != pad.
        tokenizer.pad_token = tokenizer.eos_token
    device = causal_lm(model).get_output_embeddings().weight.device
    # Unsloth's own `dtype=None` rule (bfloat16 where supported, else float16) is pick_dtype's on a GPU.
    dtype = kwargs["dtype"] or pick_dtype("auto", device)
    return LoadedModel(
        model, tokenizer, device, dtype, eos_token_ids(tokenizer, model), tokenizer.pad_token_id
    )


def keep_padding_mask(model: torch.nn.Module) -> int:
    """Make Unsloth's decoders honour the attention mask in training mode too (left padding).

    Returns how many decoders were marked (those with an `embed_tokens`).
    """
    decoders = [m for m in model.modules() if hasattr(m, "embed_tokens")]
    for decoder in decoders:
        decoder._unsloth_keep_padding_mask = True
    return len(decoders)


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module):
    """Unsloth's fast generation for the block; afterwards the model is back in the mode it was in,
    with gradient checkpointing as configured (for_inference turns it off, for_training re-arms it)."""
    was_training = model.training
    FastLanguageModel.for_inference(model)
    try:
        yield model
    finally:
        # None = the gradient checkpointing mode chosen at get_peft_model ("unsloth" or off).
        FastLanguageModel.for_training(model)
        if not was_training:  # e.g. an evaluation before training: eval mode, checkpointing still armed
            model.eval()


def save_merged(
    model, tokenizer, out_dir: str | Path, kind: str = "merged_16bit", quantization: str = "q4_k_m"
) -> Path:
    """Write the student merged into the base weights: a 16-bit model folder or a GGUF file.

    The merge takes the active adapter only, so the student ('default') is activated first (never
    the EMA teacher). GGUF export runs llama.cpp's converter, which Unsloth installs (git + a C++
    build) on first use.
    """
    if kind not in SAVE_KINDS:
        raise ValueError(f"kind must be one of {SAVE_KINDS}, got '{kind}'")
    out_dir = Path(out_dir)
    model.base_model.set_adapter(STUDENT_ADAPTER)
    if kind == "merged_16bit":
        model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
    else:
        model.save_pretrained_gguf(str(out_dir), tokenizer, quantization_method=quantization)
    return out_dir


def export_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    cfg: ModelConfig,
    kind: str = "merged_16bit",
    quantization: str = "q4_k_m",
) -> Path:
    """Merge a saved run adapter (runs/<name>/adapter) into its base model and export it.

    Unsloth loads an adapter folder as base (from adapter_config.json) + adapter.
    """
    kwargs = unsloth_load_kwargs(cfg, str(adapter_dir), gradient_checkpointing=False)
    kwargs["revision"] = None  # cfg.revision names the base model's revision, not the local adapter's
    if kwargs["dtype"] is not None:
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    model, tokenizer = FastLanguageModel.from_pretrained(**kwargs)
    return save_merged(model, tokenizer, out_dir, kind, quantization)

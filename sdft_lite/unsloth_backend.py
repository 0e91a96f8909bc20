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
    check_model_source,
    eos_token_ids,
    linear_module_names,
    load_adapter_weights,
    load_error,
    loaded_dtype,
    resolve_model_name,
)

log = logging.getLogger(__name__)
SAVE_KINDS = ("merged_16bit", "gguf")


def load_student(cfg: ModelConfig, gradient_checkpointing: bool, seed: int) -> LoadedModel:
    """Base model (4-bit when asked) + a fresh trainable LoRA adapter 'default', via Unsloth."""
    from peft import PeftModel

    name = resolve_model_name(cfg.name)
    check_model_source("model.name", name)
    kwargs = unsloth_load_kwargs(cfg, name, gradient_checkpointing)
    if kwargs["dtype"] is not None:
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(**kwargs)
    except (OSError, ValueError) as e:
        raise load_error("model.name", name, e) from None
    present = set(linear_module_names(model))
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
    # What Unsloth loaded, not what was asked: below compute capability 8.0 it loads float16 for
    # bfloat16 (and for auto), and the trainer's fp16/bf16 switch must match the weights.
    dtype = loaded_dtype(model)
    if kwargs["dtype"] is not None and dtype != kwargs["dtype"]:
        log.warning(
            "model.dtype is %s, but Unsloth loaded %s on this GPU (no native bfloat16 below compute "
            "capability 8.0): training runs in %s",
            cfg.dtype,
            *[str(dtype).removeprefix("torch.")] * 2,
        )
    log.info("student loaded: %s on %s, dtype %s", cfg.name, device, str(dtype).removeprefix("torch."))
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

    The student is loaded as training loaded it (`cfg` is the run's `model` section: the same
    model, `model.revision` and adapter shape), then the saved weights go into its adapter. Not
    Unsloth's own load of the adapter folder: that loads the base from the Hub's default branch
    (its `revision` names the adapter's repo), so a run that pinned a revision would be merged
    onto other weights.
    """
    loaded = load_student(cfg, gradient_checkpointing=False, seed=0)
    load_adapter_weights(loaded.model, adapter_dir)
    return save_merged(loaded.model, loaded.tokenizer, out_dir, kind, quantization)

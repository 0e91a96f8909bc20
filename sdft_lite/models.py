"""Model loading for the `hf` backend (transformers + PEFT + bitsandbytes), and the two things
the trainer needs from any model: final hidden states and the output head.

The student is a LoRA adapter ("default") on a frozen, optionally 4-bit, base. Everything that
touches the network goes through `decoder_hidden_states` and `output_head`, so the Unsloth
backend only has to provide the same two.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import DEMO_MODEL, ModelConfig

log = logging.getLogger(__name__)

STUDENT_ADAPTER = "default"
# Tokens that end an assistant turn in common chat templates; added to the EOS set when present.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
)


class ModelLoadError(Exception):
    """User-facing model loading problem (message says what to do)."""


@dataclass
class LoadedModel:
    model: nn.Module  # a peft.PeftModel (student) or a plain causal LM (external teacher)
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    eos_ids: list[int]
    pad_id: int


def resolve_model_name(name: str) -> str:
    if name == DEMO_MODEL:
        from .demo import demo_model_path

        return str(demo_model_path())
    return name


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# Native bfloat16 matmuls start at compute capability 8.0 (Ampere). Below it, e.g. a T4 (7.5),
# `torch.cuda.is_bf16_supported()` still says True (it counts emulation), but bf16 runs emulated and
# slow, and Unsloth quietly loads float16 instead; its own rule is the same capability test.
BF16_MIN_CAPABILITY = (8, 0)


def choose_dtype(requested: str, device_type: str, capability: tuple[int, int] | None = None) -> str:
    """The dtype name to load in: `model.dtype` unless it is 'auto'; then bfloat16 on a GPU of
    compute capability 8.0 or more, float16 on older GPUs, float32 on a CPU.

    A pure rule (the capability is an input), so it is tested for a T4 or an A100 anywhere.
    """
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return (
            "bfloat16" if capability is not None and tuple(capability) >= BF16_MIN_CAPABILITY else "float16"
        )
    return "float32"  # CPU matmuls in bf16 are slow on most laptop CPUs


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    capability = cuda_capability(device)
    name = choose_dtype(dtype, device.type, capability)
    if name == "bfloat16" and capability is not None and capability < BF16_MIN_CAPABILITY:
        log.warning(
            "model.dtype bfloat16 on a GPU of compute capability %d.%d: it has no native bfloat16 and "
            "runs it emulated (slow); model.dtype auto picks float16 there",
            *capability,
        )
    return getattr(torch, name)


def loaded_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's weights were loaded in, read from the model (its input embeddings,
    which are never quantized), not the one asked for: a backend may load another (Unsloth loads
    float16 on a T4 when bfloat16 is asked), and training's fp16/bf16 switch must follow the weights."""
    weight = getattr(causal_lm(model).get_input_embeddings(), "weight", None)
    if weight is not None and weight.dtype.is_floating_point:
        return weight.dtype
    return next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)


def load_tokenizer(name: str, cfg: ModelConfig, key: str = "model.name"):
    from transformers import AutoTokenizer

    check_model_source(key, name)
    try:
        tok = AutoTokenizer.from_pretrained(
            name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise load_error(key, name, e) from None
    if tok.pad_token_id is None:
        # pad == eos is safe here: every mask is derived from lengths, never from ids != pad.
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------- loading errors


def _shown(name: str) -> str:
    """The demo model by its recipe name, anything else as given."""
    return DEMO_MODEL if name == resolve_model_name(DEMO_MODEL) else name


def _looks_like_path(name: str) -> bool:
    windows_drive = len(name) > 1 and name[1] == ":"
    return name.startswith(("/", "./", "../", "~", "\\")) or windows_drive or Path(name).exists()


def check_model_source(key: str, name: str) -> None:
    """Raise ModelLoadError for a local model folder that cannot be one (missing, empty, no or a
    broken config.json), with the fix; Hub ids pass (their problems show when they load)."""
    if not _looks_like_path(name):
        return
    path = Path(name).expanduser()
    fix = (
        f"Fix: set {key} to a folder written by save_pretrained (config.json, the weights, "
        "the tokenizer files), or to a Hub id"
    )
    if not path.exists():
        raise ModelLoadError(f"{key}: {name} does not exist. {fix}")
    if not path.is_dir():
        raise ModelLoadError(f"{key}: {name} is a file, not a model folder. {fix}")
    config = path / "config.json"
    if not config.is_file():
        inside = sorted(p.name for p in path.iterdir())[:6]
        what = f"it holds {', '.join(inside)}" if inside else "it is empty"
        raise ModelLoadError(f"{key}: {name} has no config.json ({what}), so it is not a model folder. {fix}")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(
            f"{key}: {config} is not valid JSON ({e}). Fix: save the model again with save_pretrained, "
            "or copy config.json again from where the model came from"
        ) from None


def load_error(key: str, name: str, e: BaseException) -> ModelLoadError:
    """A ModelLoadError for a model or tokenizer that failed to load: the key, the model and the fix."""
    first = next((line for line in str(e).strip().splitlines() if line.strip()), type(e).__name__)
    shown = _shown(name)
    if _looks_like_path(name):
        return ModelLoadError(
            f"{key}: cannot load the model folder {shown}: {first} Fix: the folder must be written by "
            "save_pretrained (config.json, the weights and the tokenizer files)"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    unreachable = offline or "couldn't connect" in first.lower() or "offline" in first.lower()
    if isinstance(e, OSError) and unreachable:
        return ModelLoadError(
            f"{key}: '{shown}' is not in the local Hugging Face cache and the Hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}. Fix: download it once while online "
            f"(`hf download {shown}`), or set {key} to a local model folder"
        )
    return ModelLoadError(
        f"{key}: cannot load '{shown}' from the Hugging Face Hub: {first} Fix: check the id (and "
        "model.revision), log in with `hf auth login` for a gated or private model, or use a local folder"
    )


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (4-bit ones included), the output head left out:
    the names `lora.target_modules` can list. A layer LoRA already wraps counts once, by its name."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    names = set()
    for name, module in lm.named_modules():
        if not isinstance(module, nn.Linear) or module is head or ".lora_" in name:
            continue
        parts = name.split(".")
        names.add(parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1])
    return sorted(names)


def check_target_modules(model: nn.Module, target_modules: list[str] | str) -> None:
    """Every name in `lora.target_modules` must match a module (PEFT's rule: the full name or its
    last dotted parts); otherwise ModelLoadError naming the missing ones and the linear layers there are."""
    if target_modules == "all-linear":
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ModelLoadError(
            f"model.lora.target_modules: {missing} match no module of this model. Its linear layers are "
            f"{linear_module_names(model)}: list some of those, or use target_modules: all-linear"
        )


def eos_token_ids(tokenizer, model) -> list[int]:
    """The generation EOS set: generation_config's ids, the tokenizer's eos and end-of-turn tokens."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    if not ids:
        raise ModelLoadError("the tokenizer and generation config define no end-of-sequence token")
    return sorted(ids)


def check_target_modules_from_config(config, cfg: ModelConfig) -> None:
    """`check_target_modules` before any weight is loaded: on an empty model (meta device) built
    from the model's transformers config, for a check before the run folder is touched."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    check_target_modules(model, cfg.lora.target_modules)


def load_base_model(
    name: str, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, key: str = "model.name"
):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = dict(dtype=dtype, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    check_model_source(key, name)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise load_error(key, name, e) from None
    if cfg.load_in_4bit and device.type == "cpu":
        _keep_cpu_4bit_trainable(model)
    return model


def _keep_cpu_4bit_trainable(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, the first no-grad eval forward (our rollout) converts each
    Linear4bit weight to a packed layout whose matmul has no autograd support, and the next
    training forward fails ("a view of a leaf Variable ... in-place"). Turning the per-module
    switch off keeps one layout that serves both generation and training.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_student(cfg: ModelConfig, gradient_checkpointing: bool, seed: int) -> LoadedModel:
    """Base model (4-bit when asked) + a fresh trainable LoRA adapter named 'default'."""
    from peft import LoraConfig, get_peft_model

    name = resolve_model_name(cfg.name)
    device = pick_device()
    dtype = pick_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(name, cfg)
    model = load_base_model(name, cfg, device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no `enable_input_require_grads()` (which also breaks
        # bitsandbytes' CPU 4-bit matmul: it adds the bias in place to a view of a grad-requiring leaf).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    check_target_modules(model, cfg.lora.target_modules)
    torch.manual_seed(seed)  # LoRA init
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora, adapter_name=STUDENT_ADAPTER)
    dtype = loaded_dtype(model)
    log.info("student loaded: %s on %s, dtype %s", cfg.name, device, str(dtype).removeprefix("torch."))
    return LoadedModel(
        model, tokenizer, device, dtype, eos_token_ids(tokenizer, model), tokenizer.pad_token_id
    )


def load_adapter_weights(
    model: nn.Module, adapter_dir: str | Path, adapter_name: str = STUDENT_ADAPTER
) -> None:
    """Load a saved adapter folder's weights (a run's adapter/) into `model`'s adapter `adapter_name`,
    which must have the same shape (the run's `model.lora`); ModelLoadError when it does not."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    device = next(model.parameters()).device
    try:
        state = load_peft_weights(str(adapter_dir), device=str(device))
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    except (OSError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load the adapter in {adapter_dir}: {first}") from None
    missing = [k for k in result.missing_keys if f".{adapter_name}." in k]
    if result.unexpected_keys or missing:
        raise ModelLoadError(
            f"the adapter in {adapter_dir} does not fit the recipe's model.lora (missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}): export with the recipe the run was trained with"
        )


def load_frozen(name: str, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A separate teacher model (research option): frozen, eval mode, no adapter."""
    model = load_base_model(resolve_model_name(name), cfg, device, dtype, key="teacher.model")
    model.requires_grad_(False)
    return model.eval()


# --------------------------------------------------------------------------- forward pieces


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PeftModel (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [n, H] -> logits [n, V], including model-specific scaling (Gemma softcap, Cohere scale)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    scale = getattr(lm.config, "logit_scale", None)

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden.to(head.weight.dtype))
        if scale is not None:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    # A plain bias-free fp32 linear head: the loss may then write logits into its own buffers
    # (losses.chunked_distillation_loss). Quantized, scaled or softcapped heads stay opaque.
    plain = type(head) is nn.Linear and head.bias is None and scale is None and not softcap
    apply.linear_weight = head.weight if plain and head.weight.dtype == torch.float32 else None
    return apply


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def decoder_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Final (post-norm) hidden states [B, L, H] without computing any logits."""
    decoder = causal_lm(model).get_decoder()
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def model_path_for_display(name: str) -> str:
    return str(Path(name)) if Path(name).exists() else name

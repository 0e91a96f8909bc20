"""Model loading for the `hf` backend (transformers + PEFT + bitsandbytes), and the two things
the trainer needs from any model: final hidden states and the output head.

The student is a LoRA adapter ("default") on a frozen, optionally 4-bit, base. Everything that
touches the network goes through `decoder_hidden_states` and `output_head`, so the Unsloth
backend only has to provide the same two.
"""

from __future__ import annotations

import logging
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


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU matmuls in bf16 are slow on most laptop CPUs


def load_tokenizer(name: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        # pad == eos is safe here: every mask is derived from lengths, never from ids != pad.
        tok.pad_token = tok.eos_token
    return tok


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


def load_base_model(name: str, cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
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
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as e:
        raise ModelLoadError(
            f"could not load model '{name}': {e}. Use a local folder, or a Hub id that is cached or reachable."
        ) from None
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
    return LoadedModel(
        model, tokenizer, device, dtype, eos_token_ids(tokenizer, model), tokenizer.pad_token_id
    )


def load_frozen(name: str, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A separate teacher model (research option): frozen, eval mode, no adapter."""
    model = load_base_model(resolve_model_name(name), cfg, device, dtype)
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

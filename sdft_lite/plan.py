"""`sdft-lite plan`: the peak memory a recipe needs, estimated before any weight is loaded.

Everything comes from the model's config.json (layer count and sizes) and the recipe. An SDFT
step has three phases that never hold their working memory at the same time, on top of what
stays allocated for the whole run ("static"):

  static   base weights, LoRA adapter + its gradients + optimizer states, EMA adapter + shadow
  rollout  KV cache of `generate` for batch_size * num_generations sequences, sampling logits
  teacher  one layer's working set at teacher-prompt length (no grad), teacher hidden states
  student  activations saved for backward (or only layer inputs with gradient checkpointing),
           loss chunks, the teacher statistics kept for the loss

peak = static + the largest phase (+ the CUDA context on a GPU). Lengths are the recipe's
maximums (longest prompt, teacher prompt and completion), so real batches usually need less.
The formulas count tensors; allocator caching and fragmentation are not modelled, which is why
`fits` keeps 8% of a card free. `benchmarks/plan_vs_measured.py` checks the estimate against
measured peaks on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GiB = 2**30
MiB = 2**20
CARD_SIZES_GB = (8, 12, 16, 24)
# Share of an "N GB" card that training can count on: the driver and the allocator's
# fragmentation take the rest (a "16 GB" T4 reports 14.7 GiB to PyTorch).
USABLE_FRACTION = 0.92
CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces, outside the allocator
# NF4 with double quantization: 4 bits per weight, an 8-bit absmax per 64-weight block and an
# fp32 second-level scale per 256 blocks (bitsandbytes' defaults, ours and Unsloth's).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# LoRA tensors are float32 (PEFT upcasts adapters of a 16-bit base), so are their gradients;
# optimizer state bytes per trainable parameter:
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 0, "adafactor": 1}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(Exception):
    """The model's config.json cannot be found or read; the message says how to get it."""


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Arch:
    """The model sizes the estimate needs, read from config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # per expert for mixture-of-experts models
    vocab: int
    tied: bool  # lm_head shares the input embedding
    experts: int = 1  # MLP copies per layer (1 = dense)
    active_experts: int = 1  # experts each token passes through
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, config: dict | Any) -> Arch:
        """From a config.json mapping or a transformers config (multimodal: its text_config)."""
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        text = d.get("text_config")
        if isinstance(text, dict) and "hidden_size" in text:
            d = {**text, "tie_word_embeddings": d.get("tie_word_embeddings", text.get("tie_word_embeddings"))}

        def first(*keys, default=None):
            return next((d[k] for k in keys if d.get(k) is not None), default)

        hidden = first("hidden_size", "n_embd", "d_model")
        layers = first("num_hidden_layers", "n_layer", "num_layers")
        heads = first("num_attention_heads", "n_head")
        vocab = first("vocab_size")
        missing = [
            k
            for k, v in (
                ("hidden_size", hidden),
                ("num_hidden_layers", layers),
                ("num_attention_heads", heads),
                ("vocab_size", vocab),
            )
            if v is None
        ]
        if missing:
            raise PlanError(f"config.json lacks {', '.join(missing)}: cannot estimate memory for this model")
        experts = first("num_experts", "num_local_experts", "n_routed_experts", default=1) or 1
        return cls(
            hidden=hidden,
            layers=layers,
            heads=heads,
            kv_heads=first("num_key_value_heads", default=heads),
            head_dim=first("head_dim", default=hidden // heads),
            intermediate=(
                first("moe_intermediate_size", "intermediate_size")
                if experts > 1
                else first("intermediate_size", "n_inner", default=4 * hidden)
            ),
            vocab=vocab,
            # transformers' own default is True, but assuming a separate lm_head errs on the safe side.
            tied=bool(first("tie_word_embeddings", default=False)),
            experts=experts,
            active_experts=first("num_experts_per_tok", default=1) if experts > 1 else 1,
            qkv_bias=bool(first("attention_bias", default=d.get("model_type") == "qwen2")),
        )

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer (one expert for the MLP ones)."""
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def copies(self, name: str) -> int:
        return self.experts if name in ("gate_proj", "up_proj", "down_proj") else 1

    @property
    def linear_params(self) -> int:
        """Weights of all decoder-layer linear layers (what 4-bit quantizes)."""
        per_layer = sum(i * o * self.copies(n) for n, (i, o) in self.projection_shapes().items())
        return self.layers * per_layer

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (when untied), norms and biases: kept in the compute dtype."""
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return embed + self.layers * (2 * self.hidden + bias) + self.hidden

    @property
    def total_params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        shapes = self.projection_shapes()
        return self.layers * sum(
            r * (shapes[n][0] + shapes[n][1]) * self.copies(n) for n in targets if n in shapes
        )


@dataclass(frozen=True)
class Settings:
    """The recipe values the estimate depends on (suggestions are `dataclasses.replace` of these)."""

    device: str = "cuda"
    backend: str = "hf"
    method: str = "sdft"
    dtype_bytes: int = 2
    load_in_4bit: bool = True
    lora_r: int = 16
    targets: tuple[str, ...] = PROJECTIONS
    batch_size: int = 4
    num_generations: int = 1
    max_prompt_tokens: int = 512
    max_teacher_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    gradient_checkpointing: bool = True
    teacher_kind: str = "ema"
    external_teacher: bool = False
    optimizer: str = "adamw_torch"
    chunk_budget_mb: float = 64.0
    divergence: str = "forward"
    alpha: float = 0.5
    support: str = "full"

    @classmethod
    def from_recipe(cls, recipe, device: str = "cuda", backend: str | None = None) -> Settings:
        m, d, g, t = recipe.model, recipe.data, recipe.generation, recipe.train
        dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(m.dtype, 2 if device == "cuda" else 4)
        targets = PROJECTIONS if m.lora.target_modules == "all-linear" else tuple(m.lora.target_modules)
        return cls(
            device=device,
            backend=backend or ("hf" if m.backend == "auto" else m.backend),
            method=recipe.method.name,
            dtype_bytes=dtype_bytes,
            load_in_4bit=m.load_in_4bit,
            lora_r=m.lora.r,
            targets=targets,
            batch_size=t.batch_size,
            num_generations=g.num_generations,
            max_prompt_tokens=d.max_prompt_tokens,
            max_teacher_prompt_tokens=d.max_teacher_prompt_tokens,
            max_new_tokens=g.max_new_tokens,
            gradient_checkpointing=t.gradient_checkpointing,
            teacher_kind=recipe.teacher.kind,
            external_teacher=bool(recipe.teacher.model),
            optimizer=t.optimizer,
            chunk_budget_mb=recipe.loss.chunk_budget_mb,
            divergence=recipe.loss.divergence,
            alpha=recipe.loss.alpha,
            support=recipe.loss.support,
        )


# --------------------------------------------------------------------------- the plan


@dataclass
class Component:
    name: str
    bytes: int
    phase: str  # static | rollout | teacher | student | overhead
    detail: str = ""


@dataclass
class Plan:
    model: str
    arch: Arch
    settings: Settings
    components: list[Component] = field(default_factory=list)

    def phase_bytes(self, phase: str) -> int:
        return sum(c.bytes for c in self.components if c.phase == phase)

    @property
    def peak_phase(self) -> str:
        return max(("rollout", "teacher", "student"), key=self.phase_bytes)

    @property
    def total(self) -> int:
        """Estimated peak bytes: static + the largest phase + overhead."""
        return self.phase_bytes("static") + self.phase_bytes(self.peak_phase) + self.phase_bytes("overhead")

    def fits(self, gb: float) -> bool:
        """Whether the run fits a card sold as `gb` GB (USABLE_FRACTION of it counted)."""
        return self.total <= gb * GiB * USABLE_FRACTION

    def suggestions(self, gb: float) -> list[str]:
        """Recipe changes, biggest saving first, until the plan fits `gb` GB (empty when it fits)."""
        return suggest(self, gb * GiB * USABLE_FRACTION)


def estimate(
    recipe,
    model_config: dict | Any,
    device: str = "cuda",
    backend: str | None = None,
    model_name: str | None = None,
) -> Plan:
    """Peak memory of one training step of `recipe` on `device`, from the model's config alone."""
    arch = Arch.from_config(model_config)
    return _estimate(arch, Settings.from_recipe(recipe, device, backend), model_name or recipe.model.name)


def _estimate(arch: Arch, s: Settings, model_name: str) -> Plan:
    components = _static(arch, s) + _rollout_and_teacher(arch, s) + _student(arch, s)
    if s.device == "cuda":
        components.append(
            Component(
                "CUDA context and workspaces", CUDA_CONTEXT_BYTES, "overhead", "outside PyTorch's allocator"
            )
        )
    return Plan(model_name, arch, s, components)


def _static(arch: Arch, s: Settings) -> list[Component]:
    """What stays allocated for the whole run: weights, adapter(s), gradients, optimizer states."""
    db = s.dtype_bytes
    if s.load_in_4bit:
        out = [
            Component(
                "base weights: decoder linears",
                int(arch.linear_params * NF4_BYTES_PER_PARAM),
                "static",
                f"{arch.linear_params / 1e6:.0f}M params in 4-bit NF4 (+ double-quant scales)",
            )
        ]
    else:
        out = [
            Component(
                "base weights: decoder linears",
                arch.linear_params * db,
                "static",
                f"{arch.linear_params / 1e6:.0f}M params x {db} bytes",
            )
        ]
    out.append(
        Component(
            "base weights: embeddings, head, norms",
            arch.other_params * db,
            "static",
            f"{arch.other_params / 1e6:.0f}M params x {db} bytes (never quantized)"
            + ("" if arch.tied else "; untied lm_head"),
        )
    )
    if s.external_teacher:
        out.append(
            Component(
                "external teacher weights",
                sum(c.bytes for c in out),
                "static",
                "teacher.model, assumed the size of the student",
            )
        )
    lora = arch.lora_params(s.lora_r, s.targets)
    opt = OPTIMIZER_STATE_BYTES.get(s.optimizer, 8)
    out.append(
        Component(
            "LoRA adapter + grads + optimizer",
            lora * (8 + opt),
            "static",
            f"{lora / 1e6:.2f}M params x (4 weight + 4 grad + {opt} {s.optimizer}) bytes, fp32",
        )
    )
    if s.method == "sdft" and s.teacher_kind == "ema" and not s.external_teacher:
        out.append(
            Component(
                "EMA teacher adapter + fp32 shadow", lora * 8, "static", "second adapter of the same shape"
            )
        )
    return out


def _rows(s: Settings) -> int:
    """Sequences per micro-batch: each prompt's completions."""
    return s.batch_size * (s.num_generations if s.method == "sdft" else 1)


def _rollout_and_teacher(arch: Arch, s: Settings) -> list[Component]:
    """Generation (KV cache) and the teacher's no-grad forward; SFT has neither."""
    if s.method != "sdft":
        return []
    db, rows, seq = s.dtype_bytes, _rows(s), s.max_prompt_tokens + s.max_new_tokens
    t_tokens = rows * (s.max_teacher_prompt_tokens + s.max_new_tokens)
    return [
        Component(
            "rollout KV cache",
            2 * arch.layers * arch.kv_heads * arch.head_dim * seq * rows * db,
            "rollout",
            f"2 x {arch.layers} layers x {arch.kv_heads} kv heads x {arch.head_dim} x {seq} tokens x "
            f"{rows} sequences x {db} bytes",
        ),
        Component(
            "rollout: prefill layer + sampling logits",
            rows * s.max_prompt_tokens * _layer_working_set(arch, db) + 4 * rows * arch.vocab * 4,
            "rollout",
            "one layer's working set over the prompts; a few fp32 [sequences, vocab] tensors",
        ),
        *_rollout_copies(arch, s),
        Component(
            "teacher forward (no grad)",
            t_tokens * (_layer_working_set(arch, db) + arch.hidden * db),
            "teacher",
            f"{t_tokens} tokens: one layer's working set + final hidden states",
        ),
    ]


def _rollout_copies(arch: Arch, s: Settings) -> list[Component]:
    """CPU, fp32 weights: the rollout's transposed head and merged LoRA weights (sampling.py),
    made only under their size caps."""
    from .sampling import DECODE_HEAD_COPY_MAX_BYTES, MERGED_LORA_MAX_BYTES

    if s.device != "cpu" or s.dtype_bytes != 4 or s.backend == "unsloth":
        return []
    out = []
    head = arch.vocab * arch.hidden * 4
    if head <= DECODE_HEAD_COPY_MAX_BYTES:
        out.append(
            Component(
                "rollout: transposed output head",
                head,
                "rollout",
                "fp32 [hidden, vocab] copy, made where that matmul layout is this CPU's fastest",
            )
        )
    shapes = arch.projection_shapes()
    merged = arch.layers * sum(i * o * arch.copies(n) * 4 for n, (i, o) in shapes.items() if n in s.targets)
    if not s.load_in_4bit and 0 < merged <= MERGED_LORA_MAX_BYTES:
        out.append(
            Component("rollout: merged LoRA weights", merged, "rollout", "fp32 W + BA of each LoRA layer")
        )
    return out


def _student(arch: Arch, s: Settings) -> list[Component]:
    """The student's forward + backward: saved activations, loss chunks, the teacher's kept states."""
    db, rows = s.dtype_bytes, _rows(s)
    tokens, loss_tokens = rows * (s.max_prompt_tokens + s.max_new_tokens), rows * s.max_new_tokens
    layer = _saved_per_token_layer(arch, s)
    if not s.gradient_checkpointing:
        act = tokens * (arch.layers + 1) * layer
        detail = f"{tokens} tokens x {arch.layers} layers of saved activations (no checkpointing)"
    elif s.backend == "unsloth":  # Unsloth's checkpointing keeps the layer inputs in CPU RAM
        act = tokens * 2 * layer
        detail = f"{tokens} tokens: layer inputs offloaded to CPU RAM (Unsloth); one layer recomputed with its grads"
    else:
        act = tokens * (arch.layers * arch.hidden * db + 2 * layer)
        detail = f"{tokens} tokens: {arch.layers} layer inputs + one layer recomputed with its grads"
    act += 2 * tokens * arch.hidden * db  # final hidden states and their gradient
    out = [
        Component("student activations", act, "student", detail),
        Component(
            "loss chunks",
            _loss_bytes(arch.vocab, loss_tokens, s),
            "student",
            f"{loss_tokens} completion tokens, loss.chunk_budget_mb {s.chunk_budget_mb:g}"
            + (", vocabulary tiles" if _vocab_tiled(s) else ""),
        ),
    ]
    if s.method == "sdft":
        out.append(
            Component("teacher hidden states kept for the loss", loss_tokens * arch.hidden * db, "student")
        )
    return out


def _layer_working_set(arch: Arch, db: int) -> int:
    """Bytes per token of one layer's largest live tensors in a no-grad forward (the MLP)."""
    return 3 * arch.intermediate * arch.active_experts * db + 4 * arch.hidden * 4


def _saved_per_token_layer(arch: Arch, s: Settings) -> int:
    """Bytes per token that one decoder layer saves for backward.

    Eager transformers + PEFT: two RMSNorms (fp32 copies of their input and output), the q/k/v
    and attention outputs (k and v repeated to all heads for SDPA), and four MLP intermediates
    (gate, up, act(gate), product). Unsloth's fused kernels keep the norm inputs in the compute
    dtype and two of the MLP intermediates.
    """
    db, qdim, mlp = s.dtype_bytes, arch.heads * arch.head_dim, arch.intermediate * arch.active_experts
    if s.backend == "unsloth":
        return 2 * arch.hidden * db + 4 * qdim * db + 2 * mlp * db
    return 6 * arch.hidden * 4 + 5 * qdim * db + 4 * mlp * db


def _loss_spec(s: Settings):
    from .losses import LossSpec

    return LossSpec(
        divergence=s.divergence, alpha=s.alpha, support=s.support, chunk_budget_mb=s.chunk_budget_mb
    )


def _vocab_tiled(s: Settings) -> bool:
    """Whether the loss streams the head in vocabulary tiles (tiled_loss.vocab_tiled_loss): forward KL
    over the full vocabulary or a top-k support, with one fp32 head for both sides (CPU, a
    self-teacher; assumes a plain linear head). A separate teacher's head goes by row chunks."""
    from .losses import _effective_divergence

    forward = _effective_divergence(_loss_spec(s)) == "forward"  # JSD at alpha 0 included, as in the loss
    one_head = s.method == "sdft" and not s.external_teacher
    return one_head and s.dtype_bytes == 4 and forward and s.support in ("full", "topk")


def _loss_bytes(vocab: int, tokens: int, s: Settings) -> int:
    from .losses import rows_per_chunk
    from .tiled_loss import GROUP_ROWS, TILE_BYTES

    if _vocab_tiled(s):  # two fp32 [2 rows, tile] buffers per row group, tile <= vocab
        whole_vocab = 2 * 2 * min(tokens, GROUP_ROWS) * vocab * 4
        return int(min(TILE_BYTES, s.chunk_budget_mb * MiB, whole_vocab))
    rows = rows_per_chunk(vocab, _loss_spec(s))
    return int(s.chunk_budget_mb * MiB * min(1.0, tokens / rows))


# --------------------------------------------------------------------------- suggestions


def _what_ifs(s: Settings) -> list[tuple[str, Settings]]:
    """Single changes that lower memory: (Settings field, new settings)."""
    r = dataclasses.replace
    out = []
    if not s.gradient_checkpointing:
        out.append(("gradient_checkpointing", r(s, gradient_checkpointing=True)))
    if not s.load_in_4bit:
        out.append(("load_in_4bit", r(s, load_in_4bit=True)))
    if s.batch_size > 1:
        out.append(("batch_size", r(s, batch_size=s.batch_size // 2)))
    if s.num_generations > 1 and s.method == "sdft":
        out.append(("num_generations", r(s, num_generations=s.num_generations // 2)))
    if s.max_new_tokens > 32:
        out.append(("max_new_tokens", r(s, max_new_tokens=s.max_new_tokens // 2)))
    if s.max_teacher_prompt_tokens >= 2 * s.max_prompt_tokens and s.max_teacher_prompt_tokens > 64:
        out.append(
            (
                "max_teacher_prompt_tokens",
                r(s, max_teacher_prompt_tokens=max(s.max_prompt_tokens, s.max_teacher_prompt_tokens // 2)),
            )
        )
    if s.lora_r > 8:
        out.append(("lora_r", r(s, lora_r=s.lora_r // 2)))
    if s.teacher_kind == "ema" and s.method == "sdft":
        out.append(("teacher_kind", r(s, teacher_kind="base")))
    if s.optimizer == "adamw_torch" and s.device == "cuda":
        out.append(("optimizer", r(s, optimizer="adamw_8bit")))
    if s.chunk_budget_mb > 16:
        out.append(("chunk_budget_mb", r(s, chunk_budget_mb=s.chunk_budget_mb / 2)))
    return out


RECIPE_KEYS = {
    "gradient_checkpointing": "train.gradient_checkpointing",
    "load_in_4bit": "model.load_in_4bit",
    "batch_size": "train.batch_size",
    "num_generations": "generation.num_generations",
    "max_new_tokens": "generation.max_new_tokens",
    "max_teacher_prompt_tokens": "data.max_teacher_prompt_tokens",
    "lora_r": "model.lora.r",
    "teacher_kind": "teacher.kind",
    "optimizer": "train.optimizer",
    "chunk_budget_mb": "loss.chunk_budget_mb",
}


def _describe(name: str, old: Settings, new: Settings) -> str:
    before, after = getattr(old, name), getattr(new, name)
    fmt = lambda v: str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    text = f"{RECIPE_KEYS[name]}: {fmt(after)} (was {fmt(before)})"
    if name == "batch_size":
        text += (
            f"; multiply train.gradient_accumulation_steps by {before // after} to keep the effective batch"
        )
    if name == "teacher_kind":
        text += "; the base teacher needs no EMA adapter"
    return text


def suggest(plan: Plan, limit_bytes: float, max_changes: int = 6) -> list[str]:
    """Greedy: apply the change that saves most until the plan fits `limit_bytes` (or nothing helps).

    One line per recipe key, in the order first changed, with the estimated total once applied.
    """
    steps: list[tuple[str, Plan]] = []
    current = plan
    while current.total > limit_bytes and len(steps) < max_changes:
        options = [(name, _estimate(plan.arch, s, plan.model)) for name, s in _what_ifs(current.settings)]
        options = [(n, p) for n, p in options if p.total < current.total]
        if not options:
            break
        name, current = min(options, key=lambda option: option[1].total)
        steps = [(n, p) for n, p in steps if n != name] + [(name, current)]  # one line per key
    lines = [f"{_describe(n, plan.settings, p.settings)}  -> {p.total / GiB:.1f} GiB" for n, p in steps]
    if current.total > limit_bytes:
        lines.append("still too large: use a smaller model or a GPU with more memory")
    return lines


# --------------------------------------------------------------------------- config.json


def load_model_config(name: str, revision: str | None = None) -> dict:
    """config.json of a local folder, the demo model, or a Hub id (cached, else downloaded if online)."""
    from .models import resolve_model_name

    path = Path(resolve_model_name(name)).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"{path} has no config.json")
        try:
            return json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise PlanError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:  # pragma: no cover - installed with transformers
        raise PlanError(f"cannot look up '{name}': huggingface_hub is not installed") from None
    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text(encoding="utf-8"))
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise PlanError(
            f"config.json of '{name}' is not cached and HF_HUB_OFFLINE is set: "
            f"download it once with `hf download {name} config.json`"
        )
    try:
        return json.loads(
            Path(hf_hub_download(name, "config.json", revision=revision)).read_text(encoding="utf-8")
        )
    except Exception as e:
        raise PlanError(
            f"could not get config.json of '{name}' ({type(e).__name__}: {e}); "
            "give a local model folder or check the Hub id"
        ) from None


def plan_recipe(recipe, device: str = "cuda") -> Plan:
    """The plan for a recipe on `device`: its backend, with `auto` resolved as on this machine."""
    backend = recipe.model.backend
    if backend == "auto":
        from .backends import choose_backend, cuda_available, unsloth_installed

        backend, _ = choose_backend("auto", cuda_available(), unsloth_installed())
    return estimate(recipe, load_model_config(recipe.model.name, recipe.model.revision), device, backend)


# --------------------------------------------------------------------------- output


def format_plan(plan: Plan, sizes_gb: tuple[float, ...] = CARD_SIZES_GB) -> str:
    a, s = plan.arch, plan.settings
    dtype = {4: "float32", 2: "16-bit"}[s.dtype_bytes]
    lines = [
        f"memory plan: {plan.model}",
        f"  {a.total_params / 1e6:.0f}M params ({a.layers} layers, hidden {a.hidden}, vocab {a.vocab}), backend "
        f"{s.backend} on {s.device}, {dtype} compute, {'4-bit' if s.load_in_4bit else 'unquantized'} base, "
        f"{'with' if s.gradient_checkpointing else 'no'} gradient checkpointing",
        "",
        f"  {'component':42} {'phase':8} {'MiB':>9}",
    ]
    for c in plan.components:
        lines.append(f"  {c.name:42} {c.phase:8} {c.bytes / MiB:9.1f}   {c.detail}")
    peak = plan.peak_phase
    lines += [
        "",
        f"  peak = static {plan.phase_bytes('static') / GiB:.2f} + {peak} phase {plan.phase_bytes(peak) / GiB:.2f}"
        + (f" + overhead {plan.phase_bytes('overhead') / GiB:.2f}" if plan.phase_bytes("overhead") else "")
        + f" = {plan.total / GiB:.2f} GiB (the phases do not overlap; lengths at their recipe maximums)",
    ]
    if s.device == "cuda":
        lines.append("")
        for gb in sizes_gb:
            if plan.fits(gb):
                lines.append(f"  {gb:>4g} GB GPU: fits")
            else:
                lines.append(f"  {gb:>4g} GB GPU: does not fit; change:")
                lines += [f"      {step}" for step in plan.suggestions(gb)]
    return "\n".join(lines)


def check_fits_visible_gpu(plan: Plan) -> str | None:
    """A refusal message when CUDA is visible and the plan exceeds the GPU's free memory, else None."""
    import torch

    if plan.settings.device != "cuda" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    # mem_get_info has just created this process's CUDA context, so `free` already excludes it.
    need = plan.total - plan.phase_bytes("overhead")
    if need <= free:
        return None
    steps = suggest(plan, free + plan.phase_bytes("overhead"))
    return (
        f"this recipe needs about {need / GiB:.1f} GiB of GPU memory but {torch.cuda.get_device_name()} has "
        f"{free / GiB:.1f} GiB free of {total / GiB:.1f} GiB. Change: "
        + "; ".join(steps)
        + ". See `sdft-lite plan <recipe>`; run with --force to try anyway."
    )

"""The recipe: one typed schema, with help text on every field.

A recipe is a YAML file whose sections map onto the classes below. The same help text feeds
`sdft-lite keys`, `sdft-lite validate`, the README's key table and the app's tooltips, so it is
written for users.

Loading never raises a traceback at the user: `load_recipe` collects every problem (unknown
keys with a did-you-mean, wrong types, missing files, cross-field conflicts) and raises one
`RecipeError` that lists them all.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError

# The paper's teacher prompt (SDFT, Shenfeld et al. 2026, reference code).
PAPER_TEACHER_TEMPLATE = (
    "{prompt}\n\n"
    "This is an example for a response to the question:\n"
    "{demonstration}\n\n"
    "Now answer with a response of your own, including the thinking process."
)

# Reserved model name for the built-in demo model shipped in the package.
DEMO_MODEL = "sdft-lite/demo"
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


class RecipeError(UserError):
    """A recipe (or its overrides) is invalid. `problems` lists every issue found."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank: size of the low-rank update. 8-64 is typical.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (update is scaled by alpha / r).")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input. 0 keeps Unsloth's fused kernels usable."
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear' for every linear layer but the output head.",
    )


class ModelConfig(Section):
    name: str = Field(
        ...,
        description=f"Hugging Face Hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct), a local model folder, or '{DEMO_MODEL}' for the built-in demo model.",
    )
    backend: Literal["auto", "hf", "unsloth"] = Field(
        "auto",
        description="'hf' = transformers + PEFT + bitsandbytes (any device, CPU included); 'unsloth' = Unsloth kernels (NVIDIA GPU); 'auto' picks unsloth when CUDA and unsloth are available, else hf.",
    )
    load_in_4bit: bool = Field(
        True,
        description="Load the base weights in 4-bit NF4 (bitsandbytes). The LoRA adapter stays in higher precision.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype. 'auto' = bfloat16 on GPUs of compute capability 8.0+ (A100, RTX 30xx and newer), float16 on older GPUs (T4, V100), float32 on CPU.",
    )
    max_seq_length: int = Field(
        2048, ge=16, description="Longest teacher prompt + completion the model will see."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = Field(False, description="Allow model code from the Hub repository to run.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter settings.")


class DataConfig(Section):
    source: str = Field(
        ...,
        description="Training data: a .jsonl/.json/.csv/.parquet file, a folder saved with datasets.save_to_disk, or a Hub dataset id. Relative paths are resolved against the recipe's folder, then the working directory.",
    )
    split: str = Field("train", description="Split to use for a Hub dataset or a saved DatasetDict.")
    prompt_column: str = Field(
        "prompt",
        description="Column with the question: a string, or a list of chat messages ({role, content}) whose last user turn is the question.",
    )
    demonstration_column: str = Field(
        "demonstration", description="Column with the expert demonstration shown to the teacher."
    )
    answer_column: str | None = Field(
        None, description="Optional column with a reference answer, used only for evaluation."
    )
    system_prompt: str | None = Field(
        None,
        description="System message added to string prompts (both student and teacher) when a chat template is used.",
    )
    teacher_template: str = Field(
        PAPER_TEACHER_TEMPLATE,
        description="How the teacher sees the question: must contain {prompt} and {demonstration}. Default is the SDFT paper's.",
    )
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Wrap prompts in the tokenizer's chat template: 'auto' = when the tokenizer has one.",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra arguments to apply_chat_template for both sides (e.g. {enable_thinking: false}).",
    )
    max_prompt_tokens: int = Field(
        512, ge=1, description="Longest student prompt in tokens; longer rows are bad rows."
    )
    max_teacher_prompt_tokens: int = Field(
        1024,
        ge=1,
        description="Longest teacher prompt in tokens. Longer demonstrations are truncated (never the question).",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="Rows with a missing/empty prompt or demonstration, or a too-long prompt: 'error' stops with the row numbers, 'skip' drops them and reports which.",
    )
    limit: int | None = Field(
        None,
        ge=1,
        description="Use only the first N training rows (after bad-row handling and the eval split).",
    )
    eval_source: str | None = Field(
        None,
        description="Held-out evaluation data (same formats as source). Leave empty to use eval_fraction.",
    )
    eval_split: str = Field(
        "test", description="Split of eval_source to use when it is a Hub dataset or a saved DatasetDict."
    )
    eval_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of source held out for evaluation when eval_source is empty.",
    )


class MethodConfig(Section):
    name: Literal["sdft", "sft", "sdpo"] = Field(
        "sdft",
        description="'sdft' = self-distillation from demonstrations (on-policy). 'sft' = supervised fine-tuning baseline. 'sdpo' = online self-distillation (planned).",
    )


class TeacherConfig(Section):
    kind: Literal["base", "live", "ema"] = Field(
        "ema",
        description="'base' = the initial model (adapter off), 'live' = the current student, 'ema' = a moving average of the student's adapter (the paper's choice).",
    )
    ema_rate: float = Field(
        0.01,
        gt=0.0,
        le=1.0,
        description="EMA update rate: teacher <- (1 - rate) * teacher + rate * student. Paper: 0.01.",
    )
    sync_steps: int = Field(1, ge=1, description="Update the EMA teacher every N optimizer steps.")
    model: str | None = Field(
        None,
        description="Research option: a separate teacher model (Hub id or folder) sharing the student's tokenizer. Empty = self-teacher.",
    )


class LossConfig(Section):
    divergence: Literal["forward", "reverse", "jsd"] = Field(
        "forward",
        description="'forward' = KL(teacher || student) (the paper's runs), 'reverse' = KL(student || teacher), 'jsd' = generalized Jensen-Shannon with alpha.",
    )
    alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="JSD mixing: 0 = forward KL, 1 = reverse KL. Only for jsd."
    )
    support: Literal["full", "topk", "sampled"] = Field(
        "full",
        description="Tokens the divergence runs over: the full vocabulary, the top-k tokens, or only the sampled token (reverse KL only).",
    )
    topk: int = Field(100, ge=1, description="k for support: topk.")
    topk_source: Literal["student", "teacher"] = Field(
        "student", description="Whose top-k tokens define the support."
    )
    add_tail: bool = Field(
        True,
        description="topk: add one bucket for the remaining probability mass (else renormalise the top-k).",
    )
    skip_first_tokens: int = Field(
        3, ge=0, description="Leave the first N completion tokens out of the loss (the paper's code drops 3)."
    )
    is_clip: float | None = Field(
        None,
        gt=0.0,
        description="Importance-sampling cap: weight each token by min(p_train / p_rollout, is_clip). Empty = off (on-policy).",
    )
    chunk_budget_mb: float = Field(
        128.0,
        gt=0.0,
        description="Memory for one chunk of output-head logits. The loss never materialises [tokens, vocab] for the whole batch.",
    )
    head_precision: Literal["auto", "fp32"] = Field(
        "auto",
        description="CPU, forward KL with the self-teacher (full vocabulary, or the student's top-k): 'auto' runs the loss's output-head products as bf16x3 (three bf16 products with fp32 sums, ~1e-5 relative error; the loss ~2x faster) where the CPU has AMX bf16 tiles, fp32 elsewhere; 'fp32': always fp32.",
    )


class GenerationConfig(Section):
    num_generations: int = Field(1, ge=1, description="Completions sampled per prompt. Paper: 1.")
    max_new_tokens: int = Field(256, ge=1, description="Longest student completion.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature. Paper: 1.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold (1 = off).")
    top_k: int = Field(0, ge=0, description="Sample only from the k most likely tokens (0 = off).")
    engine: Literal["sdft", "generate"] = Field(
        "sdft",
        description="'sdft' = built-in sampling loop (KV cache, exact inverse-CDF sampling, one prefill per prompt shared by its samples; on CPU a lean decode step for Llama, Qwen2, Qwen3 and Mistral models); 'generate' = transformers' model.generate with the recipe's sampling settings only (the model folder's generation_config.json is ignored).",
    )


class TrainConfig(Section):
    learning_rate: float = Field(1e-4, gt=0.0, description="Peak learning rate for the LoRA parameters.")
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warm-up.")
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to train. Empty = run num_epochs over the data."
    )
    num_epochs: float = Field(1.0, gt=0.0, description="Passes over the data when max_steps is empty.")
    batch_size: int = Field(
        4, ge=1, description="Prompts per micro-batch (each gives num_generations completions)."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in backward to save memory."
    )
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor"] = Field(
        "adamw_torch", description="Optimizer (8-bit ones need bitsandbytes and a GPU)."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A step whose loss or gradient is NaN/inf: 'stop' ends the run as failed (a diverged run is never a success; the last checkpoint is kept); 'skip' drops that step's update, counts it (status.json and metrics.jsonl: skipped_steps) and goes on.",
    )
    seed: int = Field(42, description="Seed for data order, LoRA init and sampling.")
    logging_steps: int = Field(1, ge=1, description="Write a metrics.jsonl line every N optimizer steps.")
    sample_steps: int = Field(
        10, ge=1, description="Write example completions to samples.jsonl every N steps."
    )
    save_steps: int = Field(100, ge=1, description="Save a checkpoint every N optimizer steps.")
    save_total_limit: int | None = Field(2, ge=1, description="Keep at most N checkpoints (empty = all).")
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate every N steps (empty = only before and after)."
    )
    report_to: list[Literal["none", "tensorboard", "wandb", "trackio"]] = Field(
        default_factory=lambda: ["none"], description="Experiment trackers to log to, when installed."
    )


SCORERS = ("exact", "normalized", "contains", "regex", "numeric")


class ProbeConfig(Section):
    name: str = Field(..., description="Name of the prior skill this probe set measures (shown in tables).")
    source: str = Field(..., description="Probe data file/folder/Hub id (same formats as data.source).")
    split: str = Field("train", description="Split for a Hub dataset or saved DatasetDict.")
    prompt_column: str = Field("prompt", description="Column with the question.")
    answer_column: str = Field("answer", description="Column with the reference answer.")
    scorer: str | None = Field(None, description="Scorer for this probe set; empty = eval.scorer.")
    limit: int | None = Field(None, ge=1, description="Use only the first N rows.")


class EvalConfig(Section):
    scorer: str = Field(
        "exact",
        description="How a completion is judged against the reference answer: exact, normalized (case/space/punctuation-insensitive), contains, regex (the answer is a pattern searched in the completion), numeric (last number equals the answer), or 'module:function' (a Python function you write: fn(completion, answer, example) -> bool or float; it runs your code).",
    )
    extract: str | None = Field(
        None,
        description="Regex applied to each completion before scoring; its first group (or whole match) is scored.",
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest answer generated during evaluation (greedy).")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch during evaluation.")
    limit: int | None = Field(None, ge=1, description="Evaluate at most N rows of each set (empty = all).")
    before: bool = Field(True, description="Evaluate before training (the baseline row of the table).")
    teacher: bool = Field(
        True,
        description="Before training, also score the teacher (question + demonstration in the prompt) on the new-task set: the 'teacher' row shows whether the demonstration helps this model, i.e. whether SDFT has a signal.",
    )
    after: bool = Field(True, description="Evaluate after training.")
    probes: list[ProbeConfig] = Field(
        default_factory=list,
        description="Prior-skill probe sets: retention on these is the forgetting measure.",
    )


class OutputConfig(Section):
    dir: str = Field("runs", description="Folder that holds run folders (relative to the working directory).")
    name: str | None = Field(
        None,
        description="Run folder name: one folder inside output.dir (letters, digits, . _ -; at most 100 characters). Empty = the recipe file's name.",
    )
    if_exists: Literal["error", "resume", "overwrite"] = Field(
        "error",
        description="When the run folder exists: 'error' stops, 'resume' continues from its last checkpoint, 'overwrite' replaces it.",
    )

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str | None) -> str | None:
        problem = run_name_problem(name) if name is not None else None
        if problem:
            raise ValueError(problem)
        return name


RUN_NAME_MAX = 100


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot be a run folder inside output.dir, or None: a single folder name only,
    so no run can reach outside output.dir or into another run (`..`, `/x`, `a/b`, `.`)."""
    if not name or name.strip() != name:
        return f"run name {name!r} is empty or starts/ends with a space: use e.g. my-run"
    if name.startswith(".") or not re.fullmatch(r"[\w.+-]+", name):
        return (
            f"run name {name!r} must be a single folder name (letters, digits, . _ + -, not starting "
            "with '.'; no '/', '\\' or spaces): use e.g. my-run"
        )
    if len(name) > RUN_NAME_MAX:
        return f"run name is {len(name)} characters long: use at most {RUN_NAME_MAX}"
    return None


class Recipe(Section):
    model: ModelConfig
    data: DataConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> Recipe:
        problems = cross_field_problems(self)
        if problems:
            # Raised as ValueError so pydantic reports it with the others.
            raise ValueError("; ".join(problems))
        return self

    def run_name(self, recipe_path: str | Path | None) -> str:
        if self.output.name:
            return self.output.name
        return Path(recipe_path).stem if recipe_path else "run"


def cross_field_problems(r: Recipe) -> list[str]:
    p = []
    for field in ("{prompt}", "{demonstration}"):
        if field not in r.data.teacher_template:
            p.append(f"data.teacher_template must contain {field}")
    if r.loss.support == "sampled" and r.loss.divergence != "reverse":
        p.append(
            "loss.support 'sampled' only estimates reverse KL: set loss.divergence: reverse, or loss.support: full|topk"
        )
    if r.method.name == "sdpo":
        p.append("method.name 'sdpo' is not available yet in this version: use sdft or sft")
    if r.data.prompt_column == r.data.demonstration_column:
        p.append(
            f"data.prompt_column and data.demonstration_column are both '{r.data.prompt_column}': the "
            "demonstration must be its own column"
        )
    if r.data.eval_source and r.data.eval_fraction > 0:
        p.append("data.eval_source and data.eval_fraction are both set: use one of them")
    if r.data.max_teacher_prompt_tokens < r.data.max_prompt_tokens:
        p.append(
            "data.max_teacher_prompt_tokens must be >= data.max_prompt_tokens (the teacher prompt contains the prompt)"
        )
    if r.data.max_teacher_prompt_tokens + r.generation.max_new_tokens > r.model.max_seq_length:
        p.append(
            f"data.max_teacher_prompt_tokens ({r.data.max_teacher_prompt_tokens}) + generation.max_new_tokens "
            f"({r.generation.max_new_tokens}) exceeds model.max_seq_length ({r.model.max_seq_length}): lower one or raise model.max_seq_length"
        )
    for where, scorer in [("eval.scorer", r.eval.scorer)] + [
        (f"eval.probes[{i}].scorer", probe.scorer) for i, probe in enumerate(r.eval.probes) if probe.scorer
    ]:
        if scorer not in SCORERS and not re.fullmatch(r"[\w.]+:\w+", scorer):
            p.append(f"{where}: '{scorer}' is not one of {', '.join(SCORERS)} or 'module:function'")
    if "none" in r.train.report_to and len(r.train.report_to) > 1:
        p.append("train.report_to: 'none' cannot be combined with trackers")
    return p


# --------------------------------------------------------------------------- loading


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        full = f"{prefix}{name}"
        keys.append(full)
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, full + "."))
    return keys


ALL_KEYS = _known_keys(Recipe)


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, ALL_KEYS, n=1, cutoff=0.6)
    if not close:  # try matching just the last part within the same section
        section, _, leaf = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in ALL_KEYS if k.rpartition(".")[0] == section]
        leaf_close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)
        close = [f"{section}.{leaf_close[0]}" if section else leaf_close[0]] if leaf_close else []
    return f" - did you mean '{close[0]}'?" if close else ""


def _format_error(err: dict) -> str:
    loc = ".".join(str(x) for x in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{loc}'{_did_you_mean(loc)}"
    if kind == "missing":
        return f"missing required key '{loc}'"
    if kind == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
        return f"{loc}: {msg}" if loc else msg
    got = err.get("input")
    got_s = f", got {got!r}" if not isinstance(got, dict | list) or len(repr(got)) < 60 else ""
    return f"{loc}: {err['msg'].lower()}{got_s}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], value parsed as YAML, so numbers/bools/lists work)."""
    if "=" not in text:
        raise RecipeError(
            [f"override '{text}' must look like key.sub=value (e.g. train.max_steps=10)"], "command line"
        )
    key, _, raw = text.partition("=")
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise RecipeError([f"override key '{key}' is not a dotted name like train.max_steps"], "command line")
    parts = key.split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if _is_text_key(parts) and value is not None and not isinstance(value, str):
        # `data.system_prompt=Note: one word` is text, not the mapping {Note: one word}; so is
        # `output.name=2024` (not an int). Quotes still work: `key='a: b'` gives a: b.
        value = raw
    return parts, value


def _leaf_annotation(parts: list[str]) -> Any:
    """The schema's type annotation for a dotted key (None when the key is not in the schema)."""
    model: Any = Recipe
    info = None
    for part in parts:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = info.annotation
    return info.annotation if info else None


def _is_text_key(parts: list[str]) -> bool:
    """A key typed `str` or `str | None`: its override value is the text as written."""
    ann = _leaf_annotation(parts)
    return ann is str or (
        getattr(ann, "__args__", None) is not None and set(ann.__args__) == {str, type(None)}
    )


def set_key(data: dict, key: str, value: Any) -> None:
    """data['a']['b'] = value for key 'a.b', creating (or replacing non-mapping) sections on the way."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        set_key(data, ".".join(parts), value)
    return data


def validate_dict(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(
            [f"the top level must be a mapping of sections (model:, data:, ...), got {type(data).__name__}"],
            source,
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            problems.extend(
                _format_error(err).split("; ")
                if err["type"] == "value_error" and not err["loc"]
                else [_format_error(err)]
            )
        raise RecipeError(problems, source) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that records keys given twice in one mapping (plain YAML keeps the later one
    silently, so a recipe could train with a value its author did not see)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                self.duplicates.append(
                    f"key '{key}' is given twice (lines {seen[key]} and {line}): keep one of them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml_unique(text: str) -> tuple[Any, list[str]]:
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data(), loader.duplicates
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise RecipeError([f"{path} is a folder: give the recipe's .yaml file"], str(path))
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path}"], str(path))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(
            [f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): save the file as UTF-8"],
            str(path),
        ) from None
    except OSError as e:
        raise RecipeError([f"cannot read the recipe file: {e.strerror}"], str(path)) from None
    try:
        data, duplicates = _load_yaml_unique(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError([f"not valid YAML{where}: {getattr(e, 'problem', e)}"], str(path)) from None
    if duplicates:
        raise RecipeError(duplicates, str(path))
    return data if data is not None else {}


def load_recipe(
    path: str | Path | None, overrides: list[str] | None = None, data: dict | None = None
) -> Recipe:
    """Read, override, resolve and validate a recipe. Raises RecipeError listing all problems."""
    source = str(path) if path else "recipe"
    raw = read_yaml(path) if path is not None else dict(data or {})
    if not isinstance(raw, dict):
        raise RecipeError(
            [
                f"the top level must be a mapping of sections (model:, data:, train:, ...), got a "
                f"{type(raw).__name__}: see recipes/quickstart.yaml for the layout"
            ],
            source,
        )
    raw = apply_overrides(raw, overrides or [])
    base_dir = Path(path).resolve().parent if path else Path.cwd()
    # Paths are checked on the raw mapping so a missing file is reported together with type errors.
    path_problems = resolve_paths(raw, base_dir) if isinstance(raw, dict) else []
    try:
        recipe = validate_dict(raw, source)
    except RecipeError as e:
        raise RecipeError(path_problems + e.problems, source) from None
    if path_problems:
        raise RecipeError(path_problems, source)
    return recipe


# --------------------------------------------------------------------------- paths


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.endswith(DATA_EXTENSIONS) or "\\" in s


def _resolve(value: str, base_dir: Path) -> Path | None:
    p = Path(value).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    for root in (base_dir, Path.cwd()):
        if (root / p).exists():
            return (root / p).resolve()
    return None


def resolve_paths(raw: dict, base_dir: Path) -> list[str]:
    """Turn relative file paths in a raw recipe mapping into absolute ones; report missing ones.

    A value that exists on disk is a local path; one that looks like a path (starts with ./ / ~,
    or has a data file extension) must exist; anything else is taken as a Hub id.
    """
    problems = []
    for key in ("data.source", "data.eval_source", "model.name", "teacher.model"):
        section_name, attr = key.split(".")
        section = raw.get(section_name)
        value = section.get(attr) if isinstance(section, dict) else None
        if not isinstance(value, str) or not value or value == DEMO_MODEL:
            continue
        found = _resolve(value, base_dir)
        if found is not None:
            section[attr] = str(found)
        elif _looks_like_path(value):
            problems.append(_not_found(key, value, base_dir))
    probes = raw.get("eval", {}).get("probes") if isinstance(raw.get("eval"), dict) else None
    for i, probe in enumerate(probes if isinstance(probes, list) else []):
        value = probe.get("source") if isinstance(probe, dict) else None
        if isinstance(value, str) and value:
            found = _resolve(value, base_dir)
            if found is not None:
                probe["source"] = str(found)
            elif _looks_like_path(value):
                problems.append(_not_found(f"eval.probes[{i}].source", value, base_dir))
    return problems


def _not_found(key: str, value: str, base_dir: Path) -> str:
    tried = {str((base_dir / value).resolve()), str((Path.cwd() / value).resolve())}
    return f"{key}: file or folder not found: {value} (looked in {', '.join(sorted(tried))})"


# --------------------------------------------------------------------------- help text


def describe_fields(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf key, in schema order."""
    rows = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, key + "."))
            continue
        item = getattr(ann, "__args__", (None,))[0]
        if isinstance(item, type) and issubclass(item, BaseModel):  # a list of sections, e.g. eval.probes
            rows.append((key, "[]", info.description or ""))
            rows.extend(describe_fields(item, key + "[]."))
            continue
        if info.is_required():
            default = "(required)"
        else:
            value = info.get_default(call_default_factory=True)
            default = repr(value).replace("\n", "\\n")
            if len(default) > 40:
                default = default[:37] + "..."
        rows.append((key, default, info.description or ""))
    return rows


def field_help(key: str) -> str:
    return {k: h for k, _, h in describe_fields()}.get(key, "")


def markdown_table() -> str:
    lines = ["| key | default | what it does |", "|---|---|---|"]
    for key, default, help_ in describe_fields():
        lines.append(f"| `{key}` | `{default}` | {help_.replace('|', '/')} |")
    return "\n".join(lines)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

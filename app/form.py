"""The New-run form: its fields come from the recipe schema, and it turns into a recipe through the
same `load_recipe` the CLI uses, so the app cannot accept a recipe the CLI would reject.

Field widgets, defaults and help text (`info=`) are read from `sdft_lite.config`; this module only
picks which keys the form shows. Everything else stays reachable through "extra keys" lines
(`key.sub=value`, the CLI's override syntax) and through loading a recipe YAML, whose other keys
are kept as they are.
"""

from __future__ import annotations

import copy
import re
import threading
import time
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml

from sdft_lite.config import (
    DEMO_MODEL,
    Recipe,
    RecipeError,
    dump_recipe,
    field_help,
    load_recipe,
    read_yaml,
    set_key,
)
from sdft_lite.config import resolve_paths as resolve_recipe_paths

# Accordion title -> recipe keys shown as generic widgets (the rest of the form is built by hand).
SECTIONS: dict[str, list[str]] = {
    "Method and teacher": ["method.name", "teacher.kind", "teacher.ema_rate"],
    "Training budget": [
        "train.max_steps",
        "train.num_epochs",
        "train.batch_size",
        "train.gradient_accumulation_steps",
        "train.learning_rate",
        "train.lr_scheduler",
        "train.warmup_steps",
        "train.save_steps",
        "train.sample_steps",
        "train.eval_steps",
        "train.seed",
    ],
    "Generation (student rollouts)": [
        "generation.num_generations",
        "generation.max_new_tokens",
        "generation.temperature",
        "generation.top_p",
        "generation.top_k",
    ],
    "Loss": ["loss.divergence", "loss.alpha", "loss.support", "loss.topk", "loss.skip_first_tokens"],
    "Model and LoRA": [
        "model.load_in_4bit",
        "model.dtype",
        "model.backend",
        "model.max_seq_length",
        "model.lora.r",
        "model.lora.alpha",
        "train.gradient_checkpointing",
    ],
    "Data limits and prompts": [
        "data.max_prompt_tokens",
        "data.max_teacher_prompt_tokens",
        "data.on_bad_row",
        "data.limit",
        "data.eval_fraction",
        "data.system_prompt",
        "data.teacher_template",
    ],
}
GENERIC_KEYS = [k for keys in SECTIONS.values() for k in keys]
MODEL_KINDS = ["built-in demo", "Hub id or local folder"]
NO_COLUMN = "(none)"
PREVIEW_ROWS = 5
CELL_CHARS = 160
NAME_RE = re.compile(r"[A-Za-z0-9][\w.-]*")
# The shipped recipes (a source checkout): relative paths of an uploaded copy resolve here, a path
# typed in the box may be relative to the repository, and the demo model's form comes from here.
REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"
DEMO_RECIPE = RECIPES_DIR / "quickstart.yaml"


def param(key: str) -> str:
    """Handler keyword (and gradio_client parameter name) for a recipe key: dots -> '__'."""
    return key.replace(".", "__")


# Hand-built fields, by handler keyword; with GENERIC_KEYS these are every value the form sends.
SPECIAL = [
    "model_kind",
    "model_name",
    "data_source",
    "data__split",
    "data__prompt_column",
    "data__demonstration_column",
    "data__answer_column",
    "output__name",
    "extra_keys",
]
FORM_PARAMS = SPECIAL + [param(k) for k in GENERIC_KEYS]


# --------------------------------------------------------------------------- schema lookups


def field_info(key: str):
    model: Any = Recipe
    parts = key.split(".")
    for part in parts[:-1]:
        model = model.model_fields[part].annotation
    return model.model_fields[parts[-1]]


def _strip_none(annotation) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), len(args) < len(typing.get_args(annotation))
    return annotation, False


def widget_kind(key: str) -> tuple[str, list | None, bool]:
    """('dropdown', choices) | ('checkbox',) | ('int',) | ('float',) | ('text',), plus whether empty is allowed."""
    ann, optional = _strip_none(field_info(key).annotation)
    if typing.get_origin(ann) is Literal:
        return "dropdown", list(typing.get_args(ann)), optional
    if ann is bool:
        return "checkbox", None, optional
    if ann is int:
        return "int", None, optional
    if ann is float:
        return "float", None, optional
    return "text", None, optional


def default(key: str) -> Any:
    info = field_info(key)
    return None if info.is_required() else info.get_default(call_default_factory=True)


def help_text(key: str) -> str:
    """The schema's help text for `info=`. Gradio renders it as markdown without backslash escapes, so a
    '*' (multiplication in the help) would start italics: show it as '×'."""
    return field_help(key).replace(" * ", " × ")


def get_key(data: dict, key: str, fallback: Any = None) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return fallback
        node = node[part]
    return node


def _convert(key: str, value: Any) -> Any:
    kind, _, optional = widget_kind(key)
    if isinstance(value, str) and not value.strip() and (optional or kind != "text"):
        return None
    if kind in ("int", "float") and isinstance(value, str):
        # Optional numbers come from text fields: read them as YAML, so "5" is 5 and "1e-4" is 0.0001;
        # anything else goes to the schema as typed, which names the key in its message.
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# --------------------------------------------------------------------------- form -> recipe


def default_run_name(method: str | None, teacher: str | None) -> str:
    label = method or "sdft"
    if label == "sdft":
        label += f"-{teacher or 'ema'}"
    return f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"


def form_dict(values: dict, base: dict | None) -> tuple[dict, list[str]]:
    """The raw recipe mapping the form describes (base recipe + form values) and its extra-key lines."""
    d = copy.deepcopy(base) if isinstance(base, dict) else {}
    for key in GENERIC_KEYS:
        if param(key) in values:
            set_key(d, key, _convert(key, values[param(key)]))
    kind = values.get("model_kind") or MODEL_KINDS[1]
    set_key(
        d, "model.name", DEMO_MODEL if kind == MODEL_KINDS[0] else (values.get("model_name") or "").strip()
    )
    set_key(d, "data.source", (values.get("data_source") or "").strip())
    set_key(d, "data.split", (values.get("data__split") or "").strip() or "train")
    for col in ("prompt_column", "demonstration_column", "answer_column"):
        v = values.get(f"data__{col}")
        if v in (None, "", NO_COLUMN):
            if col == "answer_column":
                set_key(d, "data.answer_column", None)
            continue
        set_key(d, f"data.{col}", v)
    for key in ("model.name", "data.source"):
        section, leaf = key.split(".")
        if not get_key(d, key):
            d[section].pop(leaf, None)  # reported as "missing required key 'data.source'"
    lines = [ln.strip() for ln in (values.get("extra_keys") or "").splitlines()]
    return d, [ln for ln in lines if ln and not ln.startswith("#")]


def build_recipe(values: dict, base: dict | None, runs_dir: Path) -> tuple[Recipe | None, list[str]]:
    """Validate the form exactly as `sdft-lite validate` would; the run goes to runs_dir/<output.name>."""
    if values.get("model_kind") == MODEL_KINDS[1] and base is not None and base == demo_recipe():
        base = None  # the form's start (the demo's quickstart): its eval and probe sets suit the demo only
    d, extra = form_dict(values, base)
    name = (values.get("output__name") or "").strip()
    if not name:
        name = get_key(d, "output.name") or default_run_name(
            get_key(d, "method.name"), get_key(d, "teacher.kind")
        )
    set_key(d, "output.name", name)
    try:
        recipe = load_recipe(None, extra, data=d)
    except RecipeError as e:
        return None, list(e.problems)
    # The app owns where runs go: output.dir is its runs folder whatever a loaded recipe said.
    recipe.output.dir = str(runs_dir)
    recipe.output.if_exists = "error"
    if not NAME_RE.fullmatch(recipe.output.name or ""):
        return None, [
            f"output.name: '{recipe.output.name}' must be a plain folder name (letters, digits, - _ .)"
        ]
    return recipe, []


def data_problems(recipe: Recipe) -> list[str]:
    """What `sdft-lite train` would reject before training: the data as `load_data` reads it (columns,
    bad rows, the eval split) and models that cannot be loaded here. Messages as the CLI shows them."""
    from sdft_lite.data import DataError, load_data

    problems = []
    if recipe.data.prompt_column == recipe.data.demonstration_column:
        problems.append(
            f"data.prompt_column and data.demonstration_column are both '{recipe.data.prompt_column}': "
            "the demonstration must be a column of its own (the answer the teacher is shown)"
        )
    else:
        try:
            load_data(recipe.data)
        except DataError as e:
            problems.append(str(e) if str(e).startswith("data.") else f"data.source: {e}")
    for key, name, revision in (
        ("model.name", recipe.model.name, recipe.model.revision),
        ("teacher.model", recipe.teacher.model, None),
    ):
        problem = model_problem(key, name, revision)
        if problem:
            problems.append(problem)
    return problems


def model_problem(key: str, name: str | None, revision: str | None = None) -> str | None:
    """None when the model can be loaded without a download (demo, local folder, Hub id in the local
    cache), else what to do. The app checks before starting: a training that has to download a model
    fails offline, and online it would spend minutes before its first step."""
    if not name or name == DEMO_MODEL or Path(name).expanduser().is_dir():
        return None
    if Path(name).expanduser().is_absolute() or name.startswith((".", "~")):
        return f"{key}: folder not found: {name}"
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception as e:  # not a valid repo id
        return f"{key}: '{name}' is neither a local folder nor a Hub model id ({e})"
    if isinstance(cached, str):
        return None
    return (
        f"{key}: '{name}' is not a local folder and is not in the local Hugging Face cache: download it "
        f"first (`huggingface-cli download {name}`, needs network) or give the folder that holds it"
    )


def recipe_yaml(recipe: Recipe) -> str:
    return dump_recipe(recipe)


def plan_text(recipe: Recipe) -> str:
    """The memory plan (sdft_lite.plan) for this recipe on the device its training will use here."""
    try:
        from sdft_lite.backends import cuda_available
        from sdft_lite.plan import format_plan, plan_recipe
    except ImportError:
        return "(memory plan unavailable: this sdft-lite has no sdft_lite.plan)"
    try:
        return format_plan(plan_recipe(recipe, device="cuda" if cuda_available() else "cpu"))
    except Exception as e:  # the plan is advice: never block a launch on it
        return f"(memory plan unavailable: {type(e).__name__}: {e})"


def problems_markdown(problems: list[str], title: str = "Cannot start: fix these") -> str:
    items = "\n".join(f"- {p}".replace("\n", "\n  ") for p in problems)
    return f"**{title}** ({len(problems)}):\n\n{items}"


# --------------------------------------------------------------------------- data preview


def preview_data(source: str, split: str) -> tuple[pd.DataFrame, list[str], str]:
    """The first rows (cells shortened), the column names, and a message (a DataError's, inline)."""
    from sdft_lite.data import DataError, read_table

    source = (source or "").strip()
    if not source:
        return pd.DataFrame(), [], "Pick a data file or give a path / Hub dataset id."
    try:
        rows = read_table(source, split or "train")
    except DataError as e:
        return pd.DataFrame(), [], f"**Cannot read the dataset:** {e}"
    columns = list(dict.fromkeys(k for r in rows[:50] for k in r))
    shown = [{c: _cell(r.get(c)) for c in columns} for r in rows[:PREVIEW_ROWS]]
    return pd.DataFrame(shown, columns=columns), columns, f"{len(rows)} rows, columns: {', '.join(columns)}"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 3] + "..."


def guess_column(columns: list[str], key: str, current: str | None) -> str | None:
    """Keep the current mapping when the file has it, else the schema default or a usual alias."""
    from sdft_lite.data import COLUMN_ALIASES

    if current in columns:
        return current
    wanted = default(key)
    if wanted in columns:
        return wanted
    return next((c for c in COLUMN_ALIASES.get(key, ()) if c in columns), None)


# --------------------------------------------------------------------------- prompt preview

_tokenizers: dict[tuple, Any] = {}
_tok_lock = threading.Lock()


def tokenizer_for(recipe: Recipe):
    """The model's tokenizer, loaded on first use and cached (loading imports transformers)."""
    from sdft_lite.models import load_tokenizer, resolve_model_name

    key = (recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
    with _tok_lock:
        if key not in _tokenizers:
            _tokenizers[key] = load_tokenizer(resolve_model_name(recipe.model.name), recipe.model)
        return _tokenizers[key]


def render_prompts(recipe: Recipe) -> tuple[str, str, str]:
    """(student prompt, teacher prompt, message) for the first data row, as the model will see them."""
    from sdft_lite.data import BadRow, DataError, parse_prompt, parse_text, read_table
    from sdft_lite.prompts import PromptEncoder

    try:
        row = read_table(recipe.data.source, recipe.data.split)[0]
        prompt = parse_prompt(row.get(recipe.data.prompt_column), recipe.data.prompt_column)
        demo = parse_text(row.get(recipe.data.demonstration_column), recipe.data.demonstration_column, True)
    except (DataError, BadRow) as e:
        return "", "", f"**Cannot render row 1:** {e}"
    try:
        tok = tokenizer_for(recipe)
        enc = PromptEncoder(tok, recipe.data)
        student = enc.student_ids(prompt)
        teacher, cut = enc.teacher_ids(prompt, demo)
    except Exception as e:  # model not found, no chat template...: say so inline
        return "", "", f"**Cannot load the tokenizer or render the prompt:** {type(e).__name__}: {e}"
    note = f"row 1: student {len(student)} tokens, teacher {len(teacher)} tokens"
    if cut:
        note += " (demonstration truncated to fit data.max_teacher_prompt_tokens)"
    return tok.decode(student), tok.decode(teacher), note


# --------------------------------------------------------------------------- recipe file -> form


def read_recipe_file(path: str | Path, uploaded: bool = False) -> tuple[dict | None, str]:
    """A recipe YAML as a raw mapping with its relative paths made absolute, as the CLI resolves them:
    against the recipe's folder, then the current folder. An uploaded file sits alone in a temporary
    folder, so its relative paths are read against the shipped recipes folder (a copy of a shipped
    recipe finds its data there). A relative path typed in the box may also be relative to the
    repository (the box's example works wherever the app was started)."""
    path = Path(path).expanduser()
    if not uploaded and not path.is_absolute() and not path.exists() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path
    try:
        raw = read_yaml(path)
    except RecipeError as e:
        return None, problems_markdown(e.problems, "Cannot load this recipe")
    if not isinstance(raw, dict):
        return None, problems_markdown(
            ["the top level must be a mapping of sections (model:, data:, ...)"], "Cannot load this recipe"
        )
    folder = RECIPES_DIR if uploaded and RECIPES_DIR.is_dir() else path.resolve().parent
    missing = resolve_recipe_paths(raw, folder)
    note = f"loaded {path.name}"
    if missing:
        note += " (fix these paths in the form or in extra keys):\n\n" + "\n".join(f"- {m}" for m in missing)
    return raw, note


def demo_recipe() -> dict | None:
    """The quickstart recipe (the settings measured to work on the demo model), paths resolved and
    without its run name, or None outside a source checkout."""
    if not DEMO_RECIPE.is_file():
        return None
    raw, _ = read_recipe_file(DEMO_RECIPE)
    if raw is not None:
        raw.pop("output", None)
    return raw


def form_values(raw: dict, file_name: str | None = None) -> dict:
    """Form values (by handler keyword) for a raw recipe mapping; unknown keys stay in the base."""
    values = {param(k): get_key(raw, k, default(k)) for k in GENERIC_KEYS}
    for k in GENERIC_KEYS:  # optional numbers are text fields (see app.main._field)
        kind, _, optional = widget_kind(k)
        if optional and kind in ("int", "float"):
            values[param(k)] = "" if values[param(k)] is None else str(values[param(k)])
    model = get_key(raw, "model.name") or ""
    values.update(
        model_kind=MODEL_KINDS[0] if model == DEMO_MODEL else MODEL_KINDS[1],
        model_name=model,
        data_source=get_key(raw, "data.source") or "",
        data__split=get_key(raw, "data.split", "train"),
        data__prompt_column=get_key(raw, "data.prompt_column", default("data.prompt_column")),
        data__demonstration_column=get_key(
            raw, "data.demonstration_column", default("data.demonstration_column")
        ),
        data__answer_column=get_key(raw, "data.answer_column") or NO_COLUMN,
        output__name=get_key(raw, "output.name") or (Path(file_name).stem if file_name else ""),
        extra_keys="",
    )
    return values

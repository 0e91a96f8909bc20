"""Training rows: read the table a recipe's `data` section names, check it, turn rows into Examples.

Everything that can be wrong with the data is found here, before a model is loaded, and reported
as one `DataError` whose message names the recipe key, the file, the column(s) and the row(s).

Row numbers: "row N" is the N-th data record of its file or split, counting from 1. Header lines
(CSV) and blank lines (CSV, JSONL) are not counted, so in a CSV without blank lines or multi-line
cells row N sits on line N + 1, and in a JSONL file without blank lines row N is line N.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdft_lite.config import DATA_EXTENSIONS, DataConfig

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MAX_LISTED = 20  # bad rows shown in full in an error; the rest are counted
EVAL_SEED = 0  # fixed, not train.seed: changing the training seed must not move rows between train and eval
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# Column names often used for the same thing; used for a did-you-mean when difflib finds nothing close.
COLUMN_ALIASES = {
    "data.prompt_column": ("prompt", "question", "instruction", "input", "query", "problem", "messages"),
    "data.demonstration_column": ("demonstration", "response", "output", "completion", "solution", "answer"),
    "data.answer_column": ("answer", "final_answer", "label", "target", "solution"),
}


class DataError(Exception):
    """User-facing data problem; str() is a complete message naming the file, column(s) and row(s) and the fix."""


@dataclass
class Example:
    row: int  # 1-based data row number in its source file/split (see the module docstring)
    prompt: str | list[dict[str, str]]  # plain text, or chat messages ending with the user's question
    demonstration: str
    answer: str | None = None


@dataclass
class LoadedData:
    train: list[Example]
    eval: list[Example]
    skipped: list[tuple[str, int, str]] = field(default_factory=list)  # (split 'train'/'eval', row, reason)


# --------------------------------------------------------------------------- reading


def read_table(source: str, split: str = "train") -> list[dict]:
    """Rows of a .jsonl/.json/.csv/.parquet file, a save_to_disk folder, or a Hub dataset id."""
    path = Path(source).expanduser()
    if path.is_dir():
        rows = _read_saved(path, split)
    elif path.is_file():
        rows = _read_file(path, split)
    elif path.suffix.lower() in DATA_EXTENSIONS or not _HUB_ID.fullmatch(source):
        raise DataError(f"file or folder not found: {path.resolve()}")
    else:
        rows = _read_hub(source, split)
    if not rows:
        raise DataError(f"{source} is empty: it holds no data rows")
    return rows


def _read_file(path: Path, split: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix not in DATA_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(DATA_EXTENSIONS)}")
    try:
        if suffix == ".json":
            return _read_json(path, split)
        return {".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}[suffix](path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}: line {line_no} is not valid JSON ({e.msg}, character {e.pos + 1}); "
                    "each line of a .jsonl file must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {line_no} is a JSON {type(obj).__name__}, not an object")
            rows.append(obj)
    return rows


def _read_json(path: Path, split: str) -> list[dict]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved with a .json name
            return _read_jsonl(path)
        raise DataError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if isinstance(data, dict):
        key = split if split in data else "data" if "data" in data else None
        if key is None:
            raise DataError(
                f"{path}: expected a list of row objects, or an object with a 'data' or '{split}' key "
                f"holding one; found keys: {', '.join(map(str, data)) or '(none)'}"
            )
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of row objects, got a JSON {type(data).__name__}")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i} is a JSON {type(row).__name__}, not an object {{...}}")
    return data


def _read_csv(path: Path) -> list[dict]:
    csv.field_size_limit(2**31 - 1)  # demonstrations can exceed the default 128 KiB cell limit
    with path.open(encoding="utf-8-sig", newline="") as f:
        try:
            records = [r for r in csv.reader(f) if r]
        except csv.Error as e:
            raise DataError(f"{path}: not readable as CSV: {e}") from None
    if not records:
        return []
    header, records = records[0], records[1:]
    too_long = [i for i, r in enumerate(records, 1) if len(r) > len(header)]
    if too_long:
        raise DataError(
            f"{path}: row(s) {_first(too_long)} have more cells than the header's {len(header)} columns; "
            "quote cells that contain commas"
        )
    # Short rows get None for the missing cells, so they surface as bad rows with their row number.
    return [dict(zip(header, r + [None] * (len(header) - len(r)), strict=True)) for r in records]


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses that vary by version
        raise DataError(f"{path}: not readable as Parquet: {e}") from None


def _read_saved(path: Path, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{path} is a folder but not one written by datasets' save_to_disk; "
            f"point the recipe at a data file ({', '.join(DATA_EXTENSIONS)}) or at such a folder"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path} has no split '{split}'; its splits are: {', '.join(ds)}. Set data.split")
        ds = ds[split]
    return ds.to_list()


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cached(repo_id: str) -> bool:
    import datasets
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    name = "___".join(datasets.naming.camelcase_to_snakecase(p) for p in repo_id.split("/"))
    return hub.is_dir() or (Path(datasets.config.HF_DATASETS_CACHE) / name).is_dir()


def _read_hub(repo_id: str, split: str) -> list[dict]:
    import datasets

    no_file = f"'{repo_id}' is not a local file or folder, so it was read as a Hub dataset id"
    # Env vars are read here, not only at datasets' import, so offline set later still fails fast.
    offline = datasets.config.HF_HUB_OFFLINE or any(
        _env_true(v) for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    if offline and not _hub_cached(repo_id):
        raise DataError(
            f"{no_file}, but offline mode is on (HF_HUB_OFFLINE) and it is not in the local cache "
            "(no network / not cached). Use a local file (.jsonl/.json/.csv/.parquet) or a save_to_disk folder"
        )
    try:
        ds = datasets.load_dataset(repo_id, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"Hub dataset '{repo_id}': {e}. Set data.split") from None
        raise DataError(f"{no_file}, and loading it failed: {e}") from None
    except Exception as e:  # connection, not-found, gated, ... all mean: use something local
        raise DataError(
            f"{no_file}, and it could not be loaded ({type(e).__name__}: {e}). Without network access it must "
            "be cached already; otherwise use a local file (.jsonl/.json/.csv/.parquet)"
        ) from None
    return ds.to_list()


# --------------------------------------------------------------------------- checking rows


class BadRow(Exception):
    """Internal: a row cannot be used; the message is the reason."""


def _first(items: list, n: int = MAX_LISTED) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


def check_columns(rows: list[dict], cfg: DataConfig, where: str) -> None:
    """Raise one DataError naming every configured column that no row has."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    wanted = {"data.prompt_column": cfg.prompt_column, "data.demonstration_column": cfg.demonstration_column}
    if cfg.answer_column:
        wanted["data.answer_column"] = cfg.answer_column
    problems = []
    for key, name in wanted.items():
        if name in columns:
            continue
        close = difflib.get_close_matches(name, columns, n=1, cutoff=0.6)
        close = close or [c for c in COLUMN_ALIASES[key] if c in columns and c not in wanted.values()][:1]
        hint = f"did you mean '{close[0]}'? " if close else ""
        problems.append(f"no column '{name}' ({key}): {hint}set {key} to the column that holds it")
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise DataError(f"{where}:\n{lines}\n  the file has columns: {', '.join(map(str, columns))}")


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def parse_text(value: Any, column: str, required: bool) -> str | None:
    if _is_missing(value):
        if required:
            raise BadRow(f"column '{column}' is missing")
        return None
    if not isinstance(value, str | int | float):  # bools too: BoolQ-style answers are True/False
        raise BadRow(f"column '{column}' must be text, got {type(value).__name__}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # an int column with gaps comes back as floats from pandas/parquet: 3.0 -> "3"
    text = str(value)
    if not text.strip():
        if required:
            raise BadRow(f"column '{column}' is empty")
        return None
    return text


def _messages(value: list, column: str) -> list[dict[str, str]]:
    if not value:
        raise BadRow(f"column '{column}' is an empty list of messages")
    out = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow(f"column '{column}': message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise BadRow(f"column '{column}': message {i} has role {m['role']!r}; use {'/'.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise BadRow(
                f"column '{column}': message {i} content must be text, not {type(m['content']).__name__}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise BadRow(f"column '{column}': the last message must be the user's question (role 'user')")
    return out


def parse_prompt(value: Any, column: str) -> str | list[dict[str, str]]:
    if isinstance(value, list):
        return _messages(value, column)
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:  # chat messages stored as a JSON string (CSV cells)
            decoded = json.loads(value)
        except json.JSONDecodeError:
            decoded = None
        if isinstance(decoded, list) and decoded and all(isinstance(m, dict) for m in decoded):
            return _messages(decoded, column)
    if isinstance(value, str) or _is_missing(value):
        return parse_text(value, column, required=True)
    raise BadRow(f"column '{column}' must be text or a list of chat messages, got {type(value).__name__}")


def _convert(rows: list[dict], cfg: DataConfig) -> tuple[list[Example], list[tuple[int, str]]]:
    good, bad = [], []
    for row_no, rec in enumerate(rows, 1):
        try:
            prompt = parse_prompt(rec.get(cfg.prompt_column), cfg.prompt_column)
            demo = parse_text(rec.get(cfg.demonstration_column), cfg.demonstration_column, required=True)
            answer = (
                parse_text(rec.get(cfg.answer_column), cfg.answer_column, False)
                if cfg.answer_column
                else None
            )
            good.append(Example(row_no, prompt, demo, answer))
        except BadRow as e:
            bad.append((row_no, str(e)))
    return good, bad


def handle_bad_rows(
    good: list[Example], bad: list[tuple[int, str]], *, total: int, on_bad_row: str, split: str, where: str
) -> tuple[list[Example], list[tuple[str, int, str]]]:
    """Apply data.on_bad_row. Returns (kept, skipped). Also usable for checks made later (prompt length)."""
    if not bad:
        return good, []
    listed = "\n".join(f"  - row {r}: {why}" for r, why in bad[:MAX_LISTED])
    if len(bad) > MAX_LISTED:
        listed += f"\n  ... and {len(bad) - MAX_LISTED} more"
    if not good:
        raise DataError(
            f"{where}: no usable rows: all {total} row(s) are bad:\n{listed}\nFix the data or the columns"
        )
    if on_bad_row == "error":
        raise DataError(
            f"{where}: {len(bad)} of {total} rows are bad:\n{listed}\n"
            "Fix these rows, or set data.on_bad_row: skip to drop them"
        )
    logger.warning("%s: skipped %d of %d rows (data.on_bad_row: skip):\n%s", where, len(bad), total, listed)
    return good, [(split, r, why) for r, why in bad]


def _split_eval(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    n = len(examples)
    n_eval = max(1, round(n * fraction))
    if n - n_eval < 1:
        raise DataError(
            f"data.eval_fraction {fraction} of {n} usable row(s) leaves no training rows: "
            "lower data.eval_fraction, add rows, or set data.eval_source"
        )
    order = list(range(n))
    random.Random(EVAL_SEED).shuffle(order)
    held = set(order[:n_eval])  # both sides keep file order
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


# --------------------------------------------------------------------------- entry point


def _load_split(source: str, cfg: DataConfig, split: str, key: str) -> tuple[list[Example], list]:
    try:
        rows = read_table(source, cfg.split if split == "train" else cfg.eval_split)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None
    where = f"{key} {source}"
    check_columns(rows, cfg, where)
    good, bad = _convert(rows, cfg)
    return handle_bad_rows(good, bad, total=len(rows), on_bad_row=cfg.on_bad_row, split=split, where=where)


def load_data(cfg: DataConfig) -> LoadedData:
    """read_table(cfg.source) -> check columns -> convert rows -> bad rows -> eval split -> limit."""
    train, skipped = _load_split(cfg.source, cfg, "train", "data.source")
    eval_: list[Example] = []
    if cfg.eval_source:
        eval_, eval_skipped = _load_split(cfg.eval_source, cfg, "eval", "data.eval_source")
        skipped += eval_skipped
    elif cfg.eval_fraction > 0:
        train, eval_ = _split_eval(train, cfg.eval_fraction)
    if cfg.limit is not None:
        train = train[: cfg.limit]
    logger.info("data: %d train, %d eval, %d skipped rows", len(train), len(eval_), len(skipped))
    return LoadedData(train=train, eval=eval_, skipped=skipped)

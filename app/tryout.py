"""Try a run's adapter against its base model, and export it (adapter zip, merged model).

Models are loaded the way `sdft-lite eval` loads them (`sdft_lite.assess.load_for_eval`): the
run's recipe says which base model, dtype and 4-bit setting; the adapter goes on top. One model
per run is cached; the base model's answer comes from the same weights with the adapter
disabled, so trying a run costs one copy of the base weights, not two.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path

from sdft_lite.config import validate_dict
from sdft_lite.runs import RunFolder

from .views import read_recipe

MAX_CACHED = 2  # loaded models kept in memory; the oldest is dropped first
_cache: dict[tuple[str, float], tuple] = {}
_lock = threading.Lock()


class TryError(Exception):
    """User-facing: the run cannot be tried or exported (no adapter, ...)."""


def run_recipe(run: RunFolder):
    raw = read_recipe(run)
    if not raw:
        raise TryError(f"run {run.name} has no readable recipe.yaml")
    # Validated without re-resolving paths: trying a run must not need its training data.
    return validate_dict(raw, str(run.recipe))


def _adapter_stamp(run: RunFolder) -> float:
    cfg = run.adapter / "adapter_config.json"
    if not cfg.exists():
        state = run.read_status().get("state")
        raise TryError(
            f"run {run.name} has no adapter yet (state: {state}); it is written when training ends or is "
            "stopped with 'Stop and save'"
        )
    return cfg.stat().st_mtime


def load_run_model(run: RunFolder) -> tuple:
    """(model with the adapter, tokenizer, eos_ids, pad_id, encoder), cached per run and adapter version."""
    from sdft_lite.assess import load_for_eval
    from sdft_lite.prompts import PromptEncoder

    key = (str(run.path), _adapter_stamp(run))
    with _lock:
        if key not in _cache:
            recipe = run_recipe(run)
            model, tok, eos_ids, pad_id, _ = load_for_eval(recipe, str(run.path))
            while len(_cache) >= MAX_CACHED:
                _cache.pop(next(iter(_cache)))
            _cache[key] = (model, tok, eos_ids, pad_id, PromptEncoder(tok, recipe.data))
        return _cache[key]


def generate_pair(run: RunFolder, prompt: str, max_new_tokens: int) -> tuple[str, str]:
    """Greedy answers of the base model (adapter off) and of the run's adapter, to the same prompt."""
    import torch

    from sdft_lite.evaluate import generate_answers

    if not prompt.strip():
        raise TryError("type a prompt first")
    model, tok, eos_ids, pad_id, encoder = load_run_model(run)
    kw = dict(max_new_tokens=int(max_new_tokens), batch_size=1, eos_ids=eos_ids, pad_id=pad_id)
    with _lock, torch.no_grad():
        with model.disable_adapter():
            base = generate_answers(model, tok, encoder, [prompt], **kw)[0]
        tuned = generate_answers(model, tok, encoder, [prompt], **kw)[0]
    return _shown(base), _shown(tuned)


EMPTY_ANSWER = "(empty answer: the model ended its turn at once)"


def _shown(answer: str) -> str:
    # An empty textbox reads as "nothing happened"; say that the model answered with nothing.
    return answer if answer.strip() else EMPTY_ANSWER


# --------------------------------------------------------------------------- export


def _export_dir() -> Path:
    # Downloads are served from the system temp folder, which gradio allows, not from the runs folder.
    return Path(tempfile.mkdtemp(prefix="sdft-lite-export-"))


def base_model_label(run: RunFolder) -> tuple[str, str]:
    """(the name an exported adapter gives its base model, a note): the recipe's Hub id or
    `sdft-lite/demo`, or a local folder's name (never this machine's absolute path)."""
    name = str(read_recipe(run).get("model", {}).get("name") or "")
    path = Path(name).expanduser()
    if name and not path.is_absolute() and not name.startswith((".", "~")):
        return name, ""
    label = path.name or "base-model"
    return label, (
        f"The base model was a local folder: the adapter names it '{label}'; set "
        "base_model_name_or_path in adapter_config.json to where that model is on the machine that loads it"
    )


def adapter_zip(run: RunFolder) -> tuple[Path, str, str]:
    """(zip of the adapter folder, the base model name written into it, a note). The saved
    adapter_config.json names the path the model was loaded from (the demo model's or a local folder's
    absolute path on this machine): the exported copy names the recipe's model instead."""
    _adapter_stamp(run)
    base_model, note = base_model_label(run)
    out = _export_dir()
    folder = out / "adapter"
    shutil.copytree(run.adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    local = config.get("base_model_name_or_path")
    config["base_model_name_or_path"] = base_model
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    card = folder / "README.md"  # PEFT's model card repeats the path as `base_model:`
    if local and card.exists():
        card.write_text(card.read_text(encoding="utf-8").replace(local, base_model), encoding="utf-8")
    archive = shutil.make_archive(str(out / f"{run.name}-adapter"), "zip", root_dir=folder)
    shutil.rmtree(folder)
    return Path(archive), base_model, note


def merged_model(run: RunFolder) -> tuple[Path, Path]:
    """Merge the adapter into a full-precision copy of the base (PEFT merge_and_unload).

    Returns (folder written under the run as merged/, zip to download). Refused for runs trained on
    a 4-bit base: merging into 4-bit weights is lossy, and merging into the unquantized base gives a
    model that differs from the one trained; use the adapter on the base model instead.
    """
    _adapter_stamp(run)
    recipe = run_recipe(run)
    if recipe.model.load_in_4bit:
        raise TryError(
            f"run {run.name} trained on a 4-bit base (model.load_in_4bit: true): a merged model would "
            "not match what was trained. Download the adapter and load it on the base model (README, "
            "'Load the result anywhere')"
        )
    from peft import PeftModel
    from transformers import AutoTokenizer

    from sdft_lite.models import load_base_model, pick_device, pick_dtype, resolve_model_name

    name = resolve_model_name(recipe.model.name)
    device = pick_device()
    base = load_base_model(name, recipe.model, device, pick_dtype(recipe.model.dtype, device))
    merged = PeftModel.from_pretrained(base, str(run.adapter)).merge_and_unload()
    out = run.path / "merged"
    tmp = run.path / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(run.adapter)).save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    archive = Path(shutil.make_archive(str(_export_dir() / f"{run.name}-merged"), "zip", root_dir=out))
    return out, archive

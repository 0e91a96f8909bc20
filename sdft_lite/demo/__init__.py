"""A built-in, offline demo model and demo tasks, so SDFT runs with no downloads.

What ships:
- `sdft_lite/demo/assets/demo-model/`: a 0.46M-parameter Llama-architecture model with a
  character-level ChatML tokenizer, pretrained here on synthetic prior skills (copy,
  reverse, uppercase, add single digits) and on using a demonstration given in the
  paper's teacher prompt. Load it with `AutoModelForCausalLM.from_pretrained(demo_model_path())`.
- `recipes/data/demo/`: `train.jsonl` / `eval.jsonl` for the new skill ("Say this word
  twice: bako" -> "bako bako", never seen in pretraining) and `probe_<skill>.jsonl` per
  prior skill, with columns `prompt`, `demonstration`, `answer`.

Before fine-tuning the plain-prompt student scores ~0 on the new skill while the teacher
(same model, teacher template + demonstration) scores high: the gap SDFT closes.

Rebuild data and model (~6 min on a 2-core CPU; training runs single-threaded, and two
builds on the same machine and library versions give byte-identical files):

    python -m sdft_lite.demo build [--out DIR] [--data-dir DIR] [--seed 0] [--steps N]
    python -m sdft_lite.demo data [--data-dir DIR]        # data files only
    python -m sdft_lite.demo measure [--model DIR] [--data-dir DIR] [--limit N]

Importing this module does not import torch or transformers.
"""

from __future__ import annotations

from pathlib import Path

from .tasks import TEACHER_TEMPLATE

DEMO_MODEL_NAME = "sdft-lite/demo"
DEFAULT_STEPS = 800
REBUILD_COMMAND = "python -m sdft_lite.demo build"

_PACKAGED_MODEL = Path(__file__).parent / "assets" / "demo-model"
_REPO_ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "DEMO_MODEL_NAME",
    "TEACHER_TEMPLATE",
    "build",
    "demo_data_dir",
    "demo_model_path",
    "measure",
]


def demo_model_path() -> Path:
    """The packaged demo model folder; raises FileNotFoundError naming the rebuild command."""
    if not (_PACKAGED_MODEL / "config.json").is_file():
        raise FileNotFoundError(
            f"The demo model is missing from {_PACKAGED_MODEL}. Rebuild it with `{REBUILD_COMMAND}`."
        )
    return _PACKAGED_MODEL


def demo_data_dir() -> Path:
    """`recipes/data/demo` of the source checkout this package is imported from."""
    path = _REPO_ROOT / "recipes" / "data" / "demo"
    if not path.is_dir():
        raise FileNotFoundError(
            f"Demo data not found at {path} (it ships with a source checkout). "
            f"Write it with `python -m sdft_lite.demo data --data-dir DIR`."
        )
    return path


def build(
    out_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
) -> Path:
    """Write the demo data files, pretrain the demo model and save it; returns `out_dir`.

    New-skill prompts and word-skill probe prompts are excluded from pretraining, so those
    probes measure the skill, not memorisation (the `add` probe checks memorised sums).
    """
    from .pretrain import pretrain
    from .tasks import held_out_prompts, write_data_files

    out_dir = Path(out_dir) if out_dir is not None else _PACKAGED_MODEL
    data_dir = Path(data_dir) if data_dir is not None else _REPO_ROOT / "recipes" / "data" / "demo"
    files = write_data_files(data_dir, seed=seed)
    return pretrain(out_dir, held_out_prompts(files), seed=seed, steps=steps)


def measure(model_path: str | Path, data_dir: str | Path, limit: int | None = None) -> dict[str, float]:
    """Greedy exact-match accuracies; see `sdft_lite.demo.evaluate.measure`."""
    from .evaluate import measure as _measure

    return _measure(model_path, data_dir, limit=limit)

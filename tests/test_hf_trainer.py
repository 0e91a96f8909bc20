"""transformers' Trainer without `datasets`: a run on a data file never imports datasets, pandas
or pyarrow (~93 MiB of resident memory), and a `datasets.Dataset` made later is still handled by
the Trainer as usual. Each case runs in a fresh interpreter: pytest's own process has long since
imported all three."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe

HEAVY = ("datasets", "pandas", "pyarrow")


def python(code: str, *args: str, cwd: Path) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last."""
    res = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


TRAIN = f"""
import json, sys
from sdft_lite.cli import main
assert main(["train", sys.argv[1], "train.max_steps=1"]) == 0
print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))
"""


@pytest.mark.parametrize("source", ["jsonl", pytest.param("save_to_disk", marks=pytest.mark.slow)])
def test_training_imports_datasets_only_for_sources_that_need_it(tiny_model_dir, tiny_data, tmp_path, source):
    data = tiny_data
    if source == "save_to_disk":  # read with datasets, which is then imported after the Trainer
        import datasets

        data = tmp_path / "saved"
        datasets.Dataset.from_json(str(tiny_data)).save_to_disk(str(data))
    recipe = tiny_recipe(tiny_model_dir, data, tmp_path / "runs")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))

    imported = python(TRAIN, str(tmp_path / "r.yaml"), cwd=tmp_path)

    run = tmp_path / "runs" / "run"
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    if source == "jsonl":
        assert imported == dict.fromkeys(HEAVY, False)
    else:
        assert imported["datasets"]


@pytest.mark.slow
def test_trainer_still_recognises_a_datasets_dataset_made_later(tiny_model_dir, tmp_path):
    code = f"""
import json, sys
import sdft_lite.trainer  # imports transformers.trainer without datasets
assert "datasets" not in sys.modules
import datasets
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
ds = datasets.Dataset.from_list([{{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "junk": 1}}] * 4)
model = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})
args = TrainingArguments(output_dir="out", per_device_train_batch_size=2, report_to=[], use_cpu=True)
loader = Trainer(model=model, args=args, train_dataset=ds).get_train_dataloader()
print(json.dumps({{"dataset": loader.dataset.column_names, "batch": sorted(next(iter(loader)))}}))
"""
    # remove_unused_columns (on by default) drops what the model's forward does not take. From a
    # recognised datasets.Dataset it drops the columns themselves; from any other dataset it wraps
    # the collator instead, so the batch alone would not tell the two apart.
    assert python(code, cwd=tmp_path) == {
        "dataset": ["input_ids", "labels"],
        "batch": ["input_ids", "labels"],
    }

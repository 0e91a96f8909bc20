"""The built-in demo model and data: loadable offline, and with the gap SDFT should close.

The accuracy test measures the committed model (greedy, ~30 rows per file); nothing here
is a pinned number except the thresholds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sdft_lite.demo import (
    DEMO_MODEL_NAME,
    TEACHER_TEMPLATE,
    demo_data_dir,
    demo_model_path,
    measure,
)
from sdft_lite.demo.tasks import PRIOR_SKILLS, make_data_files

COLUMNS = {"prompt", "demonstration", "answer"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_path())


def test_import_is_light():
    code = "import sys, sdft_lite.demo; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_constants():
    assert DEMO_MODEL_NAME == "sdft-lite/demo"
    assert TEACHER_TEMPLATE.format(prompt="P", demonstration="D") == (
        "P\n\nThis is an example for a response to the question:\nD\n\n"
        "Now answer with a response of your own, including the thinking process."
    )


def test_tokenizer_round_trip_and_special_tokens(tokenizer):
    text = "Say this word twice: bako\nWhat is 7+8? ABC-12, (ok)!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokenizer.convert_tokens_to_ids(specials) == [0, 1, 2]
    # A special token in text is one token, not its characters.
    assert tokenizer("<|im_start|>a", add_special_tokens=False)["input_ids"] == [1, ids[text.index("a")]]


def test_chat_template_renders_chatml(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    full = messages + [{"role": "assistant", "content": "Yo"}]
    rendered = tokenizer.apply_chat_template(full, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\nYo<|im_end|>\n")
    # transformers 5 returns a BatchEncoding for tokenize=True.
    enc = tokenizer.apply_chat_template(
        full, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert tokenizer.decode(enc["input_ids"]) == rendered
    assistant = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(assistant) == "Yo<|im_end|>"


def test_model_loads_with_auto_classes(tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    path = demo_model_path()
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.tie_word_embeddings
    assert (path / "model.safetensors").is_file()
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert size < 10 * 2**20
    eos = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in eos
    with torch.no_grad():
        logits = model(**tokenizer("Hi", return_tensors="pt")).logits
    assert logits.shape == (1, 2, len(tokenizer))


@pytest.mark.parametrize("name", ["train", "eval", *[f"probe_{s}" for s in PRIOR_SKILLS]])
def test_data_files(name):
    path = demo_data_dir() / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows
    assert all(set(row) == COLUMNS and all(row.values()) for row in rows)


def test_train_and_eval_prompts_are_disjoint():
    prompts = {}
    for name in ("train", "eval"):
        lines = (demo_data_dir() / f"{name}.jsonl").read_text().splitlines()
        prompts[name] = {json.loads(line)["prompt"] for line in lines}
    assert not prompts["train"] & prompts["eval"]


def test_committed_data_matches_generator():
    # The committed files are exactly what `python -m sdft_lite.demo data` writes.
    for name, rows in make_data_files(seed=0).items():
        committed = (demo_data_dir() / name).read_text().splitlines()
        assert [json.loads(line) for line in committed] == rows


def test_teacher_beats_student_and_prior_skills_hold():
    acc = measure(demo_model_path(), demo_data_dir(), limit=30)
    assert acc["new_skill_student"] <= 0.1, acc
    assert acc["new_skill_teacher"] >= acc["new_skill_student"] + 0.3, acc
    for skill in PRIOR_SKILLS:
        assert acc[f"probe_{skill}"] >= 0.8, acc


@pytest.mark.slow  # the whole quickstart (400 steps, evaluation): ~90 s on the 2-core AMD EPYC
def test_quickstart_recipe_learns_the_new_skill(tmp_path):
    """The README's main job, as a user runs it: `sdft-lite train recipes/quickstart.yaml` (only the
    runs folder moved). The teacher row beats the student before training, and the student learns."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(
        [sys.executable, "-m", "sdft_lite.cli", "train", str(root / "recipes" / "quickstart.yaml"),
         f"output.dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "teacher (demo in prompt, before)" in res.stdout and "the demonstration helps" in res.stdout
    ev = json.loads((tmp_path / "runs" / "quickstart" / "eval.json").read_text())
    before, teacher, after = (ev[k]["new_task"]["accuracy"] for k in ("before", "teacher", "after"))
    assert before <= 0.05 and teacher >= 0.9  # the gap SDFT closes
    assert after >= 0.5, f"new-skill accuracy only {after:.2f} after the quickstart"
    assert set(ev["after"]) == {"step", "new_task", "copy", "reverse", "upper", "add"}

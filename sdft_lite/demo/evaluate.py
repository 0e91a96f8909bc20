"""Greedy exact-match accuracy of the demo model: new skill (student and teacher) and probes."""

from __future__ import annotations

from pathlib import Path

from . import tasks


def generate_greedy(model, tok, user_texts: list[str], max_new_tokens: int = 32, batch_size: int = 64):
    """Greedy completions of single-turn chats, batched with left padding."""
    import torch

    outputs = []
    for start in range(0, len(user_texts), batch_size):
        chats = [[{"role": "user", "content": t}] for t in user_texts[start : start + batch_size]]
        batch = _left_padded(tok, chats)
        with torch.no_grad():
            out = model.generate(
                **batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id
            )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        outputs += tok.batch_decode(new_tokens, skip_special_tokens=True)
    return outputs


def _left_padded(tok, chats):
    """Chat prompts as left-padded tensors: generation appends on the right, so prompts must end aligned."""
    side, tok.padding_side = tok.padding_side, "left"
    try:
        return tok.apply_chat_template(
            chats,
            add_generation_prompt=True,
            tokenize=True,
            padding=True,
            return_dict=True,
            return_tensors="pt",
        )
    finally:
        tok.padding_side = side


def exact_match(model, tok, rows: list[dict], teacher: bool = False, **kwargs) -> float:
    """Fraction of rows whose greedy answer equals `answer` (whitespace-stripped)."""
    texts = [tasks.teacher_prompt(r) if teacher else r["prompt"] for r in rows]
    preds = generate_greedy(model, tok, texts, **kwargs)
    return sum(p.strip() == r["answer"].strip() for p, r in zip(preds, rows, strict=True)) / max(1, len(rows))


def measure_loaded(model, tok, data_dir: str | Path, limit: int | None = None) -> dict[str, float]:
    """`measure` for a model already in memory (e.g. a PEFT student during training).

    The model is put in eval mode for the measurement and restored afterwards.
    """
    data_dir = Path(data_dir)
    eval_rows = tasks.read_jsonl(data_dir / "eval.jsonl")[:limit]
    was_training = model.training
    model.eval()
    try:
        result = {
            "new_skill_student": exact_match(model, tok, eval_rows),
            "new_skill_teacher": exact_match(model, tok, eval_rows, teacher=True),
        }
        for path in sorted(data_dir.glob("probe_*.jsonl")):
            name = path.stem.removeprefix("probe_")
            result[f"probe_{name}"] = exact_match(model, tok, tasks.read_jsonl(path)[:limit])
    finally:
        model.train(was_training)
    return result


def measure(model_path: str | Path, data_dir: str | Path, limit: int | None = None) -> dict[str, float]:
    """Load the model at `model_path` and report greedy exact-match accuracies.

    Keys: `new_skill_student` (plain prompt), `new_skill_teacher` (teacher template with the
    demonstration), and `probe_<skill>` for every `probe_<skill>.jsonl` in `data_dir`.
    `limit` keeps only the first rows of each file (for fast tests).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path)).eval()
    return measure_loaded(model, tok, data_dir, limit)

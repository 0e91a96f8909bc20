"""The teacher sees teacher_prompt + the student's exact completion ids, and both sides are
scored at the same completion positions despite different prompt lengths and padding."""

from __future__ import annotations

import torch
from conftest import tiny_recipe

from sdft_lite import trainer as trainer_mod
from sdft_lite.config import DataConfig, GenerationConfig, load_recipe
from sdft_lite.models import decoder_hidden_states, output_head
from sdft_lite.prompts import PromptEncoder, left_pad, right_pad
from sdft_lite.rollout import (
    completion_hidden,
    completion_lengths,
    concat_prompt_completion,
    generate_rollouts,
    loss_mask,
)
from sdft_lite.runs import RunFolder
from sdft_lite.train import build_trainer


def test_padded_logprobs_equal_unpadded_forward(tiny_model_dir):
    """Log-probs of completion tokens from the batched, padded layout == one unpadded forward per row."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    completions = [[20, 21, 22], [23, 24, 25, 26, 27], [28]]
    p_ids, p_mask = left_pad(prompts, pad_id=0)
    c_ids, c_mask = right_pad(completions, pad_id=0)
    ids, mask, width = concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)
    with torch.no_grad():
        hidden = completion_hidden(decoder_hidden_states(model, ids, mask), width, c_ids.shape[1])
        logp = torch.log_softmax(output_head(model)(hidden).float(), -1).gather(-1, c_ids[..., None])[..., 0]
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            full = torch.tensor([p + c])
            ref = torch.log_softmax(model(full).logits.float(), -1)[0, len(p) - 1 : -1].gather(
                -1, torch.tensor(c)[:, None]
            )[:, 0]
            assert torch.allclose(logp[i, : len(c)], ref, atol=1e-5), (i, logp[i], ref)


def test_teacher_sees_teacher_prompt_plus_exact_completion(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    recipe = load_recipe(
        None,
        data=tiny_recipe(
            tiny_model_dir,
            tiny_data,
            tmp_path / "runs",
            train={"max_steps": 1, "batch_size": 3},
            generation={"num_generations": 2, "max_new_tokens": 6},
        ),
    )
    run = RunFolder(tmp_path / "runs" / "run")
    run.prepare("error")
    trainer = build_trainer(recipe, run)

    seen = {}
    real_generate = trainer_mod.generate_rollouts

    def spy_generate(*args, **kwargs):  # the real sampler, recorded
        seen["rollout"] = real_generate(*args, **kwargs)
        seen["student_prompt"] = args[1]
        return seen["rollout"]

    real_hidden = trainer.teacher.hidden_states

    def spy_hidden(input_ids, attention_mask):  # the real teacher forward, recorded
        seen["teacher_ids"], seen["teacher_mask"] = input_ids, attention_mask
        return real_hidden(input_ids, attention_mask)

    monkeypatch.setattr(trainer_mod, "generate_rollouts", spy_generate)
    monkeypatch.setattr(trainer.teacher, "hidden_states", spy_hidden)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.compute_loss(trainer.model, batch)

    roll = seen["rollout"]
    examples = batch["examples"]
    assert roll.completion_ids.shape[0] == 2 * len(examples)  # num_generations rows per prompt
    ids, mask = seen["teacher_ids"], seen["teacher_mask"]
    prompt_width = batch["teacher_ids"].shape[1]
    for row in range(ids.shape[0]):
        ex = examples[row // 2]
        n = int(roll.lengths[row])
        completion = roll.completion_ids[row, :n].tolist()
        assert ids[row][mask[row].bool()].tolist() == ex.teacher_ids + completion
        # The completion starts right after the (left-padded) prompt, at the same column in every row.
        assert ids[row, prompt_width : prompt_width + n].tolist() == completion
        assert mask[row, prompt_width + n :].sum() == 0
    # The teacher prompt really holds the demonstration; the student's does not.
    tok = trainer.processing_class
    assert examples[0].demonstration in tok.decode(examples[0].teacher_ids)
    assert "This is an example for a response" not in tok.decode(examples[0].student_ids)


def test_eos_masking_uses_the_eos_set_and_lengths():
    pad = eos = 1  # pad == eos: masks must come from lengths
    ids = torch.tensor([[5, 6, eos, 7, pad], [5, 9, 6, 5, 6], [8, 2, 7, 7, 7]])
    lengths, clipped = completion_lengths(ids, eos_ids=[eos, 2])
    assert lengths.tolist() == [3, 5, 2]  # up to and including the first token of the EOS set
    assert clipped.tolist() == [False, True, False]
    keep = loss_mask(torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]), skip_first_tokens=1)
    assert keep.tolist() == [
        [False, True, True, False, False],
        [False, True, True, True, True],
        [False, True, False, False, False],
    ]


def test_rollout_masks_after_first_eos(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    enc = PromptEncoder(tok, DataConfig(source="x"))
    ids, mask = left_pad([enc.student_ids("reverse abc"), enc.student_ids("hi")], tok.pad_token_id)
    torch.manual_seed(0)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    # Every sampled token is an "EOS" for this call: each row must stop after exactly one token.
    vocab_ids = list(range(len(tok)))
    roll = generate_rollouts(
        model,
        ids,
        mask,
        GenerationConfig(max_new_tokens=5),
        vocab_ids,
        tok.pad_token_id,
        record_logprobs=True,
    )
    assert roll.lengths.tolist() == [1, 1] and roll.completion_mask.sum() == 2
    assert roll.logprobs.shape == roll.completion_ids.shape and (roll.logprobs[:, 0] <= 0).all()
    roll = generate_rollouts(model, ids, mask, GenerationConfig(max_new_tokens=5), [eos], tok.pad_token_id)
    for row in range(2):
        n = int(roll.lengths[row])
        assert roll.completion_mask[row, :n].all() and not roll.completion_mask[row, n:].any()
        assert eos not in roll.completion_ids[row, : n - 1].tolist()


def test_chat_prompts_keep_system_and_rewrite_last_user(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = PromptEncoder(tok, DataConfig(source="x", max_teacher_prompt_tokens=1024))
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first q"},
        {"role": "assistant", "content": "first a"},
        {"role": "user", "content": "what is 2+2"},
    ]
    student = tok.decode(enc.student_ids(messages))
    teacher_ids, truncated = enc.teacher_ids(messages, "4")
    teacher = tok.decode(teacher_ids)
    assert not truncated
    for text in (student, teacher):
        assert text.startswith("<|im_start|>system\nbe brief<|im_end|>")
        assert "first a" in text and text.endswith("<|im_start|>assistant\n")
    assert "what is 2+2\n\nThis is an example for a response to the question:\n4\n\nNow answer" in teacher
    assert "This is an example" not in student


def test_long_demonstration_is_truncated_not_the_question(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = DataConfig(source="x", max_prompt_tokens=64, max_teacher_prompt_tokens=180, system_prompt="sys")
    enc = PromptEncoder(tok, cfg)
    ids, truncated = enc.teacher_ids("keep this question", "d" * 500)
    text = tok.decode(ids)
    assert truncated and len(ids) <= 180
    assert "keep this question" in text and "Now answer with a response" in text
    assert text.endswith("<|im_start|>assistant\n") and "ddd" in text


def test_plain_prompts_without_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = PromptEncoder(
        tok,
        DataConfig(
            source="x", chat_template="never", teacher_template="Q: {prompt} A: {demonstration} Q: {prompt}"
        ),
    )
    assert tok.decode(enc.student_ids("hi {there}")) == "hi {there}"
    assert tok.decode(enc.teacher_ids("hi", "yo")[0]) == "Q: hi A: yo Q: hi"


def test_separate_teacher_of_another_hidden_size_trains(tiny_model_dir, tiny_data, tmp_path):
    """teacher.model with hidden 48 for a student with hidden 64 (same tokenizer and vocabulary):
    the loss scores each side with its own head, and training runs and moves the LoRA weights."""
    from conftest import build_model, build_tokenizer

    teacher_dir = tmp_path / "teacher"
    tok = build_tokenizer(teacher_dir)
    build_model(teacher_dir, len(tok), hidden=48, seed=1, eos=tok.convert_tokens_to_ids("<|im_end|>"))
    recipe = load_recipe(
        None,
        data=tiny_recipe(
            tiny_model_dir,
            tiny_data,
            tmp_path / "runs",
            teacher={"model": str(teacher_dir)},
            train={"max_steps": 2, "save_steps": 100},
        ),
    )
    run = RunFolder(tmp_path / "runs" / "run")
    run.prepare("error")
    trainer = build_trainer(recipe, run)
    assert trainer.teacher.external.config.hidden_size == 48
    assert trainer.model.get_base_model().config.hidden_size == 64
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)

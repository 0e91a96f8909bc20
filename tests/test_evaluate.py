"""Evaluation: scorers on hand-made cases, eval sets from a recipe, greedy generation on a tiny real
model, accuracy checks that cannot pass by accident, the teacher/student check and the table."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_recipe, write_jsonl

from sdft_lite.config import SCORERS, DataConfig, EvalConfig, RecipeError, validate_dict
from sdft_lite.data import DataError, Example
from sdft_lite.evaluate import (
    BUILTIN,
    EvalSet,
    eval_sets_from_recipe,
    evaluate,
    format_table,
    generate_answers,
    get_scorer,
    normalize,
    score_completions,
    teacher_student_check,
)
from sdft_lite.models import eos_token_ids
from sdft_lite.prompts import PromptEncoder

WORDS = ["abc", "hello", "cat", "dog", "tree", "moon", "star", "sky"]
PROMPTS = [f"reverse {w}" for w in WORDS]


def score(scorer: str, completion: str, answer: str, extract: str | None = None) -> float:
    return score_completions([completion], [answer], scorer, extract)[0]


# --------------------------------------------------------------------------- scorers


def test_builtin_scorers_match_the_recipe_schema():
    assert set(BUILTIN) == set(SCORERS)


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("  Paris\n", "Paris", 1.0),
        ("paris", "Paris", 0.0),
        ("Paris.", "Paris", 0.0),
    ],
)
def test_exact(completion, answer, expected):
    assert score("exact", completion, answer) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("The  Eiffel Tower!", "eiffel tower", 1.0),
        ("an apple", "Apple.", 1.0),
        ("Don't   stop", "dont stop", 1.0),
        ("«Paris»", "paris", 1.0),  # Unicode punctuation too
        ("Eiffel Towers", "eiffel tower", 0.0),
        ("London", "Paris", 0.0),
    ],
)
def test_normalized(completion, answer, expected):
    assert score("normalized", completion, answer) == expected


def test_normalize_is_squad_style():
    assert normalize("  The Cat, a hat; AN apple!  ") == "cat hat apple"


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("I think the answer is Paris, France.", "paris", 1.0),
        ("It is THE Eiffel tower", "Eiffel Tower", 1.0),
        ("concatenate", "cat", 0.0),  # whole words only
        ("London", "Paris", 0.0),
        ("anything", "the", 0.0),  # an answer that normalises to nothing is not in everything
    ],
)
def test_contains(completion, answer, expected):
    assert score("contains", completion, answer) == expected


def test_regex_scorer_and_invalid_pattern_names_the_row():
    assert score("regex", "The answer is 42.", r"\b42\b") == 1.0
    assert score("regex", "The answer is 420.", r"\b42\b") == 0.0
    assert score("regex", "yes", r"(?i)^\s*YES") == 1.0
    with pytest.raises(DataError, match=r"row 2: the answer '\(unclosed' is not a valid regular expression"):
        score_completions(["a", "b"], ["a", "(unclosed"], "regex", None)


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("so the total is 1,234.5 dollars", "1234.5", 1.0),
        ("first 3, then 7", "7", 1.0),  # the last number counts
        ("first 7, then 3", "7", 0.0),
        ("the temperature is -12 degrees", "-12", 1.0),
        ("the temperature is \u22124", "-4", 1.0),  # typographic minus
        ("x = -0.5", "-.5", 1.0),
        ("5-3 is the score", "3", 1.0),  # a hyphen between numbers is not a minus
        ("answer: 0.1", "0.1000000001", 1.0),  # within 1e-6
        ("answer: 0.1", "0.11", 0.0),
        ("It is 12.", "12", 1.0),  # sentence full stop is not a decimal point
        ("1,000,000 people", "1,000,000", 1.0),
        ("the answer is 12", "twelve", 0.0),  # a non-numeric answer scores 0
        ("no number here", "12", 0.0),
    ],
)
def test_numeric(completion, answer, expected):
    assert score("numeric", completion, answer) == expected


def test_extract_with_and_without_group():
    assert score("exact", "reasoning... #### 42", "42", extract=r"####\s*(\S+)") == 1.0
    assert score("exact", "reasoning... #### 42", "#### 42", extract=r"####\s*\S+") == 1.0  # whole match
    assert score("exact", "no marker 42", "42", extract=r"####\s*(\S+)") == 0.0  # no match -> ""
    assert score("numeric", "Answer: 7. Check: 9", "7", extract=r"Answer: (\S+)") == 1.0
    with pytest.raises(RecipeError, match="eval.extract"):
        score("exact", "x", "x", extract="(")


def test_user_scorer(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(
        "def starts(completion, answer, example):\n"
        "    return completion.startswith(answer)\n"
        "def half(completion, answer, example):\n"
        "    return 0.5 if example.get('level') == 'hard' else 7\n"  # 7 is clipped to 1
        "def bad(completion, answer, example):\n"
        "    return 'yes'\n"
        "def crash(completion, answer, example):\n"
        "    raise KeyError('boom')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert score_completions(["Paris!", "Rome"], ["Paris", "Paris"], "my_scorers:starts", None) == [1.0, 0.0]
    assert score_completions(
        ["a", "b"], ["a", "b"], "my_scorers:half", None, [{"level": "hard"}, {"level": "easy"}]
    ) == [0.5, 1.0]
    with pytest.raises(RecipeError, match="returned str on row 1"):
        score_completions(["a"], ["a"], "my_scorers:bad", None)
    with pytest.raises(RecipeError, match="raised KeyError on row 1"):
        score_completions(["a"], ["a"], "my_scorers:crash", None)
    with pytest.raises(RecipeError, match="eval.scorer: module 'my_scorers' has no function 'nope'"):
        get_scorer("my_scorers:nope")
    with pytest.raises(RecipeError, match=r"eval.scorer: cannot import module 'no_such_mod_xyz'.*PYTHONPATH"):
        get_scorer("no_such_mod_xyz:fn")
    with pytest.raises(RecipeError, match="eval.scorer: 'fuzzy' is not one of"):
        get_scorer("fuzzy")


# --------------------------------------------------------------------------- eval sets


def recipe_with(tiny_model_dir, tiny_data, tmp_path, **eval_section):
    return validate_dict(tiny_recipe(tiny_model_dir, tiny_data, tmp_path / "runs", eval=eval_section))


def test_eval_sets_from_recipe(tiny_model_dir, tiny_data, tmp_path):
    probe = write_jsonl(
        tmp_path / "arith.jsonl",
        [
            {"q": "1+1=", "a": 2, "level": "easy"},
            {
                "q": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="}],
                "a": "4",
            },
            {"q": "3+3=", "a": "6"},
        ],
    )
    recipe = recipe_with(
        tiny_model_dir,
        tiny_data,
        tmp_path,
        scorer="numeric",
        limit=2,
        probes=[
            {
                "name": "arith",
                "source": str(probe),
                "prompt_column": "q",
                "answer_column": "a",
                "scorer": "exact",
            },
            {"name": "arith1", "source": str(probe), "prompt_column": "q", "answer_column": "a", "limit": 1},
        ],
    )
    examples = [
        Example(3, "reverse cat", "tac", None),
        Example(5, "reverse dog", "god", "GOD"),
        Example(9, "reverse sky", "yks", None),
    ]
    new, arith, arith1 = eval_sets_from_recipe(recipe, examples)
    assert (new.name, new.answers, new.demonstrations, new.rows, new.scorer) == (
        "new_task",
        ["tac", "GOD"],
        ["tac", "god"],
        [3, 5],
        "numeric",
    )  # eval.limit 2
    assert (arith.prompts[0], arith.answers, arith.demonstrations, arith.rows, arith.scorer) == (
        "1+1=",
        ["2", "4"],
        None,
        [1, 2],
        "exact",
    )
    assert arith.prompts[1][-1] == {"role": "user", "content": "2+2="}  # chat prompts kept as messages
    assert arith.records[0] == {"q": "1+1=", "a": 2, "level": "easy", "row": 1}  # user scorers see the row
    assert (arith1.answers, arith1.scorer) == (["2"], "numeric")  # probe limit 1 beats eval.limit 2
    assert [s.name for s in eval_sets_from_recipe(recipe, [])] == [
        "arith",
        "arith1",
    ]  # no eval data, no new_task


def test_probe_errors_name_the_key_and_rows(tiny_model_dir, tiny_data, tmp_path):
    probe = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"question": "a", "answer": "x"},
            {"question": "b", "answer": ""},
            {"question": None, "answer": "z"},
        ],
    )
    recipe = recipe_with(tiny_model_dir, tiny_data, tmp_path, probes=[{"name": "p", "source": str(probe)}])
    with pytest.raises(
        DataError, match=r"no column 'prompt' \(eval.probes\[0\].prompt_column\): did you mean"
    ):
        eval_sets_from_recipe(recipe, [])
    recipe.eval.probes[0].prompt_column = "question"
    with pytest.raises(DataError) as e:
        eval_sets_from_recipe(recipe, [])
    assert "eval.probes[0]" in str(e.value) and "2 of 3 rows are bad" in str(e.value)
    assert "row 2: column 'answer' is empty" in str(e.value) and "row 3: column 'question' is missing" in str(
        e.value
    )
    recipe.eval.probes[0].limit = 1  # rows past the limit are never read, so never reported
    assert eval_sets_from_recipe(recipe, [])[0].answers == ["x"]
    recipe.eval.probes[0].source = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"eval.probes\[0\].source: file or folder not found"):
        eval_sets_from_recipe(recipe, [])


def test_eval_sets_check_scorers_and_names_before_any_model(tiny_model_dir, tiny_data, tmp_path):
    probe = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "x"}])
    ex = [Example(1, "q", "d")]
    recipe = recipe_with(
        tiny_model_dir,
        tiny_data,
        tmp_path,
        probes=[{"name": "p", "source": str(probe), "scorer": "nowhere_mod_xyz:fn"}],
    )
    with pytest.raises(RecipeError, match=r"eval.probes\[0\].scorer: cannot import module 'nowhere_mod_xyz'"):
        eval_sets_from_recipe(recipe, ex)
    recipe = recipe_with(
        tiny_model_dir, tiny_data, tmp_path, probes=[{"name": "new_task", "source": str(probe)}]
    )
    with pytest.raises(RecipeError, match=r"eval.probes\[0\].name: 'new_task' is already used"):
        eval_sets_from_recipe(recipe, ex)


# --------------------------------------------------------------------------- generation on a tiny model


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """The tiny model with larger random weights: the fixture's small init makes every completion
    the same run of newlines, which would let equality checks pass by accident."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else 0.3))
    encoder = PromptEncoder(tok, DataConfig(source="unused.jsonl", max_teacher_prompt_tokens=256))
    return model.eval(), tok, encoder, dict(eos_ids=eos_token_ids(tok, model), pad_id=tok.pad_token_id)


def gen(lm, prompts, demonstrations=None, batch_size=8):
    model, tok, encoder, ids = lm
    return generate_answers(
        model,
        tok,
        encoder,
        prompts,
        max_new_tokens=8,
        batch_size=batch_size,
        demonstrations=demonstrations,
        **ids,
    )


def test_evaluate_structure_and_determinism(lm, tmp_path):
    model, tok, encoder, ids = lm
    cfg = EvalConfig(max_new_tokens=8, batch_size=4)
    sets = [
        EvalSet(
            "new_task",
            PROMPTS,
            [w[::-1] for w in WORDS],
            [w[::-1] for w in WORDS],
            list(range(1, 9)),
            "exact",
        ),
        EvalSet("probe", PROMPTS[:5], ["x"] * 5, None, list(range(1, 6)), "contains"),
    ]
    first = evaluate(model, tok, encoder, sets, cfg=cfg, **ids)
    second = evaluate(model, tok, encoder, sets, cfg=cfg, **ids)
    assert list(first) == ["new_task", "probe"]
    for name, n in [("new_task", 8), ("probe", 5)]:
        res = first[name]
        assert set(res) == {"accuracy", "n", "seconds", "examples"}
        assert res["n"] == n and 0.0 <= res["accuracy"] <= 1.0 and res["seconds"] >= 0
        assert len(res["examples"]) == 5
        assert set(res["examples"][0]) == {"prompt", "completion", "answer", "score"}
        assert [e["completion"] for e in res["examples"]] == [
            e["completion"] for e in second[name]["examples"]
        ]
    assert first["new_task"]["examples"][0]["prompt"] == "reverse abc"
    assert len({e["completion"] for e in first["new_task"]["examples"]}) > 1  # not one degenerate output
    # Batch size changes padding only: the same greedy answers.
    assert gen(lm, PROMPTS, batch_size=3) == gen(lm, PROMPTS, batch_size=8)
    # as_teacher measures only sets with demonstrations.
    assert list(evaluate(model, tok, encoder, sets, cfg=cfg, as_teacher=True, **ids)) == ["new_task"]


def test_accuracy_is_one_on_own_answers_and_zero_on_wrong_ones(lm, tiny_model_dir, tiny_data, tmp_path):
    """A probe whose answers are the model's own greedy completions must score 100%, through the
    whole path (file -> eval set -> generation -> decode -> scorer); perturbed answers must score 0%."""
    model, tok, encoder, ids = lm
    own = gen(lm, PROMPTS)
    assert all(c.strip() for c in own)  # non-empty answers, or the probe file would have bad rows
    right = write_jsonl(
        tmp_path / "right.jsonl", [{"prompt": p, "answer": c} for p, c in zip(PROMPTS, own, strict=True)]
    )
    wrong = write_jsonl(
        tmp_path / "wrong.jsonl",
        [{"prompt": p, "answer": c + "#"} for p, c in zip(PROMPTS, own, strict=True)],
    )
    recipe = recipe_with(
        tiny_model_dir,
        tiny_data,
        tmp_path,
        max_new_tokens=8,
        batch_size=8,
        probes=[{"name": "right", "source": str(right)}, {"name": "wrong", "source": str(wrong)}],
    )
    res = evaluate(model, tok, encoder, eval_sets_from_recipe(recipe, []), cfg=recipe.eval, **ids)
    assert (res["right"]["accuracy"], res["right"]["n"]) == (1.0, 8)
    assert (res["wrong"]["accuracy"], res["wrong"]["n"]) == (0.0, 8)
    table = format_table({"before": res, "after": {"right": {**res["right"], "accuracy": 0.5}}})
    lines = table.splitlines()
    assert lines[0].split() == ["right", "(n=8)", "wrong", "(n=8)"]
    assert lines[2].split() == ["before", "100.0%", "0.0%"]
    assert lines[3].split() == ["after", "50.0%", "-"]


def test_peft_model_with_adapter_disabled_matches_the_plain_model(lm):
    from peft import LoraConfig, get_peft_model

    model, tok, encoder, ids = lm
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # make the adapter matter, so "disabled" is a real check
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    sets = [EvalSet("s", PROMPTS, ["x"] * 8, None, list(range(1, 9)), "exact")]
    cfg = EvalConfig(max_new_tokens=8, batch_size=8)
    plain = evaluate(model, tok, encoder, sets, cfg=cfg, **ids)["s"]["examples"]
    with peft_model.disable_adapter():
        base = evaluate(peft_model, tok, encoder, sets, cfg=cfg, **ids)["s"]["examples"]
    adapted = evaluate(peft_model, tok, encoder, sets, cfg=cfg, **ids)["s"]["examples"]
    assert base == plain
    assert adapted != plain


def test_generate_answers_with_demonstrations_feeds_the_teacher_prompt(lm, monkeypatch):
    model, tok, encoder, ids = lm
    demos = [w[::-1] for w in WORDS[:4]]
    fed = []
    import sdft_lite.evaluate as evaluate_mod

    original = evaluate_mod.generate_rollouts

    def spy(model, ids, mask, *args, **kwargs):  # the real rollout, recording what it is fed
        fed.extend(zip(ids.tolist(), mask.tolist(), strict=True))
        return original(model, ids, mask, *args, **kwargs)

    monkeypatch.setattr(evaluate_mod, "generate_rollouts", spy)
    teacher = gen(lm, PROMPTS[:4], demonstrations=demos)
    student = gen(lm, PROMPTS[:4])
    unpadded = [[t for t, m in zip(row, mask, strict=True) if m] for row, mask in fed]
    assert unpadded[:4] == [encoder.teacher_ids(p, d)[0] for p, d in zip(PROMPTS[:4], demos, strict=True)]
    assert unpadded[4:] == [encoder.student_ids(p) for p in PROMPTS[:4]]
    assert "This is an example for a response to the question:\ncba" in tok.decode(unpadded[0])
    assert teacher != student
    with pytest.raises(ValueError, match="one entry per prompt"):
        gen(lm, PROMPTS[:4], demonstrations=demos[:2])


def test_teacher_student_check(lm):
    model, tok, _, ids = lm
    cfg = EvalConfig(max_new_tokens=8, batch_size=8)
    # Teacher prompt == student prompt (template without extra text, empty demonstration): the two
    # accuracies must be equal. Half the answers are the model's own completions, so both are 50%.
    same = PromptEncoder(tok, DataConfig(source="unused.jsonl", teacher_template="{prompt}{demonstration}"))
    own = gen(lm, PROMPTS)
    rows = [
        Example(i + 1, p, "", c if i % 2 else c + "#")
        for i, (p, c) in enumerate(zip(PROMPTS, own, strict=True))
    ]
    res = teacher_student_check(model, tok, same, rows, cfg=cfg, **ids)
    assert set(res) == {"student", "teacher", "n", "gap", "verdict"}
    assert (res["student"], res["teacher"], res["n"], res["gap"]) == (0.5, 0.5, 8, 0.0)
    assert "does not help" in res["verdict"] and "method: sft" in res["verdict"]
    assert teacher_student_check(model, tok, same, rows, cfg=cfg, limit=3, **ids)["n"] == 3
    # All answers right on both sides: nothing to learn, said as such.
    rows = [Example(i + 1, p, "", c) for i, (p, c) in enumerate(zip(PROMPTS, own, strict=True))]
    assert "already answers" in teacher_student_check(model, tok, same, rows, cfg=cfg, **ids)["verdict"]
    # Answers = what the model writes with the demonstration in context (paper template): the
    # teacher gets all of them, the student only those it writes without the demonstration.
    paper = lm[2]
    demos = [w[::-1] for w in WORDS]
    teacher_out = gen(lm, PROMPTS, demonstrations=demos)
    rows = [
        Example(i + 1, p, d, c) for i, (p, d, c) in enumerate(zip(PROMPTS, demos, teacher_out, strict=True))
    ]
    res = teacher_student_check(model, tok, paper, rows, cfg=cfg, **ids)
    expected_student = sum(a.strip() == b.strip() for a, b in zip(own, teacher_out, strict=True)) / 8
    assert (res["teacher"], res["student"]) == (1.0, expected_student)
    assert res["gap"] >= 0.1 and "SDFT has a teacher signal" in res["verdict"]
    assert teacher_student_check(model, tok, paper, [], cfg=cfg, **ids)["n"] == 0

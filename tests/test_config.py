"""Recipes: every shipped recipe parses; bad recipes give clear, complete errors via the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdft_lite.config import (
    ALL_KEYS,
    PAPER_TEACHER_TEMPLATE,
    RecipeError,
    describe_fields,
    load_recipe,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdft_lite.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def write(tmp_path: Path, recipe: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe))
    return p


@pytest.fixture
def ok_recipe(tmp_path, tiny_data) -> dict:
    return {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}, "data": {"source": str(tiny_data)}}


def test_shipped_recipes_exist_and_validate():
    assert RECIPES, "no recipes found under recipes/"
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe.model.name


def test_defaults_follow_the_paper(ok_recipe):
    r = load_recipe(None, data=ok_recipe)
    assert r.loss.divergence == "forward" and r.loss.support == "full"
    assert r.teacher.kind == "ema" and r.teacher.ema_rate == 0.01
    assert r.data.teacher_template == PAPER_TEACHER_TEMPLATE
    assert r.loss.skip_first_tokens == 3
    assert r.generation.num_generations == 1 and r.generation.temperature == 1.0


def test_every_key_has_help():
    rows = describe_fields()
    assert len(rows) > 40
    missing = [k for k, _, h in rows if not h]
    assert not missing, f"keys without help text: {missing}"


def test_overrides_are_typed(ok_recipe):
    r = load_recipe(
        None,
        [
            "train.max_steps=7",
            "teacher.kind=base",
            "model.lora.target_modules=[q_proj, v_proj]",
            "loss.is_clip=2",
        ],
        data=ok_recipe,
    )
    assert r.train.max_steps == 7 and r.teacher.kind == "base"
    assert r.model.lora.target_modules == ["q_proj", "v_proj"] and r.loss.is_clip == 2.0


def test_all_problems_reported_at_once(tmp_path, ok_recipe):
    ok_recipe["teacher"] = {"kindd": "ema"}
    ok_recipe["train"] = {"learning_rate": "fast", "batch_size": 0}
    ok_recipe["data"]["eval_source"] = "missing/eval.jsonl"
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, ok_recipe))
    problems = e.value.problems
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "unknown key 'teacher.kindd' - did you mean 'teacher.kind'?" in text
    assert "train.learning_rate" in text and "valid number" in text
    assert "train.batch_size" in text and "greater than or equal to 1" in text
    assert "data.eval_source: file or folder not found: missing/eval.jsonl" in text


def test_cross_field_checks_name_both_keys(ok_recipe):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["loss.support=sampled", "data.teacher_template=no placeholders"], data=ok_recipe)
    text = "\n".join(e.value.problems)
    assert "loss.support" in text and "loss.divergence" in text
    assert "data.teacher_template must contain {prompt}" in text
    assert "data.teacher_template must contain {demonstration}" in text


def test_sequence_budget_checked(ok_recipe):
    with pytest.raises(RecipeError, match="exceeds model.max_seq_length"):
        load_recipe(None, ["model.max_seq_length=256", "generation.max_new_tokens=200"], data=ok_recipe)


def test_relative_paths_resolve_against_recipe_folder(tmp_path, tiny_data):
    sub = tmp_path / "recipes"
    sub.mkdir()
    recipe = {"model": {"name": "org/model"}, "data": {"source": f"../{tiny_data.name}"}}
    r = load_recipe(write(sub, recipe))
    assert Path(r.data.source) == tiny_data.resolve()


def test_hub_ids_are_not_paths(ok_recipe):
    r = load_recipe(None, data=ok_recipe)
    assert r.model.name == "Qwen/Qwen2.5-0.5B-Instruct"


def test_did_you_mean_for_leaf_typo(ok_recipe):
    with pytest.raises(RecipeError, match="did you mean 'generation.temperature'"):
        load_recipe(None, ["generation.temprature=0.7"], data=ok_recipe)


def test_known_keys_cover_sections():
    for section in ("model", "data", "method", "teacher", "loss", "generation", "train", "output"):
        assert section in ALL_KEYS


# ----------------------------------------------------------------------------- CLI


def test_cli_validate_ok(tmp_path, ok_recipe):
    res = run_cli("validate", str(write(tmp_path, ok_recipe)), "--print")
    assert res.returncode == 0, res.stderr
    assert "ok:" in res.stderr and "teacher ema" in res.stderr
    assert yaml.safe_load(res.stdout)["loss"]["divergence"] == "forward"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["teacher"].update(kindd="ema"), "did you mean 'teacher.kind'"),
        (lambda r: r["train"].update(max_steps="ten"), "train.max_steps: input should be a valid integer"),
        (
            lambda r: r["data"].update(source="nope/train.jsonl"),
            "data.source: file or folder not found: nope/train.jsonl",
        ),
        (lambda r: r.pop("model"), "missing required key 'model'"),
    ],
)
def test_cli_bad_recipe_exits_nonzero_without_traceback(tmp_path, ok_recipe, mutate, expected):
    ok_recipe.setdefault("teacher", {})
    ok_recipe.setdefault("train", {})
    mutate(ok_recipe)
    for cmd in ("validate", "train"):
        res = run_cli(cmd, str(write(tmp_path, ok_recipe)), cwd=tmp_path)
        assert res.returncode == 2, res.stderr
        assert expected in res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists(), "a bad recipe must not create a run folder"


def test_cli_missing_recipe_file(tmp_path):
    res = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "recipe file not found" in res.stderr and "Traceback" not in res.stderr


def test_cli_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  name: [unclosed\n")
    res = run_cli("validate", str(p))
    assert res.returncode == 2 and "not valid YAML at line" in res.stderr


def test_cli_bad_override(tmp_path, ok_recipe):
    res = run_cli("validate", str(write(tmp_path, ok_recipe)), "train.max_steps")
    assert res.returncode == 2 and "must look like key.sub=value" in res.stderr


def test_cli_keys_lists_help():
    res = run_cli("keys", "loss")
    assert res.returncode == 0
    assert "loss.divergence = 'forward'" in res.stdout and "KL(teacher || student)" in res.stdout
    assert "model.name" not in res.stdout


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k, _, _ in describe_fields() if f"`{k}`" not in readme]
    assert not missing, f"README lacks recipe keys: {missing} (regenerate with `sdft-lite keys --markdown`)"


def test_help_does_not_import_torch():
    code = "import sys; from sdft_lite.cli import build_parser; import sdft_lite.config; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "False"

"""Bad input gets `error:` and exit 2, never a traceback: recipes that are not mappings, not
UTF-8, with a key given twice; overrides of text keys; `eval` of a run that does not exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from conftest import tiny_recipe

from sdft_lite.config import load_recipe, parse_override

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdft_lite.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def user_error(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert res.stderr.startswith("error:") and "Traceback" not in res.stderr, res.stderr[-3000:]
    for w in words:
        assert w in res.stderr, (w, res.stderr)


def test_recipe_whose_top_level_is_a_list(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- model: x\n- data: y\n")
    for command in ("train", "validate"):
        user_error(cli(command, str(path), "train.max_steps=2", cwd=tmp_path), "top level", "mapping", "list")
    assert not (tmp_path / "runs").exists()


def test_recipe_that_is_not_utf8(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(QUICKSTART.read_bytes().replace(b"name: quickstart", "name: caf\xe9".encode("latin-1")))
    user_error(cli("train", str(path), cwd=tmp_path), "not UTF-8", "0xe9", "save the file as UTF-8")


def test_recipe_folder_instead_of_file(tmp_path):
    user_error(cli("validate", str(tmp_path), cwd=tmp_path), "is a folder", ".yaml")


def test_key_given_twice_is_refused_with_both_lines(tmp_path):
    text = QUICKSTART.read_text().replace("  max_steps: 400\n", "  max_steps: 400\n  max_steps: 4\n")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    line = text.splitlines().index("  max_steps: 4") + 1
    res = cli("validate", str(path), cwd=tmp_path)
    user_error(res, "key 'max_steps' is given twice", f"lines {line - 1} and {line}", "keep one")
    # The same key name in two sections is not a duplicate.
    assert load_recipe(QUICKSTART).model.name == "sdft-lite/demo"


def test_text_keys_take_the_override_as_written(tmp_path):
    res = cli(
        "validate",
        str(QUICKSTART),
        "data.system_prompt=Note: answer in one word",
        "output.name=2024",
        "train.max_steps=7",
        "--print",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout)
    assert resolved["data"]["system_prompt"] == "Note: answer in one word"
    assert resolved["output"]["name"] == "2024" and resolved["train"]["max_steps"] == 7
    assert parse_override("data.system_prompt='a: b'")[1] == "a: b"  # quotes still work
    assert parse_override("data.answer_column=")[1] is None
    assert parse_override("model.lora.target_modules=[q_proj, v_proj]")[1] == ["q_proj", "v_proj"]


def test_eval_of_a_run_that_does_not_exist(tiny_model_dir, tmp_path):
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "demonstration": "b", "answer": "b"}])
    recipe = tiny_recipe(tiny_model_dir, data, tmp_path / "runs")
    recipe["data"].update(answer_column="answer", eval_source=str(data))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    (tmp_path / "runs" / "quickstart" / "status.json").write_text('{"state": "failed"}')
    res = cli("eval", "quickstrat", str(path), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    user_error(res, "no run named 'quickstrat'", "runs there: quickstart", "Hub id")
    res = cli("eval", "quickstart", str(path), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    user_error(res, "has no adapter/ yet", "failed")

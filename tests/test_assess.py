"""Evaluation wired into runs and the CLI: eval.json before/after/steps, `eval`, `check`, `compare`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import tiny_recipe, write_jsonl

from sdft_lite.assess import compare_table, read_eval, run_summary
from sdft_lite.runs import RunFolder, read_jsonl


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdft_lite.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def recipe_file(tmp_path: Path, model_dir: Path, data: Path, name: str, **sections) -> Path:
    probe = write_jsonl(
        tmp_path / "probe.jsonl", [{"prompt": f"copy {w}", "answer": w} for w in ["ab", "cd", "ef"]]
    )
    recipe = tiny_recipe(model_dir, data, tmp_path / "runs", **sections)
    recipe["output"]["name"] = name
    recipe["data"]["eval_fraction"] = 0.25
    recipe["eval"] = {"max_new_tokens": 6, "probes": [{"name": "copy", "source": str(probe)}]}
    recipe["train"]["eval_steps"] = 2
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_train_records_eval_and_compare(tiny_model_dir, tiny_data, tmp_path):
    sdft = recipe_file(tmp_path, tiny_model_dir, tiny_data, "sdft")
    res = cli("train", str(sdft), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "before" in res.stdout and "after" in res.stdout and "new_task (n=2)" in res.stdout
    assert "teacher (demo in prompt, before)" in res.stdout and "before training: " in res.stdout

    run = RunFolder(tmp_path / "runs" / "sdft")
    ev = read_eval(run)
    assert set(ev) == {"before", "teacher", "after", "steps"}
    # The teacher row: the new-task set from the teacher prompt (probes have no demonstration).
    assert set(ev["teacher"]) == {"step", "new_task"} and ev["teacher"]["new_task"]["n"] == 2
    assert ev["before"]["step"] == 0 and ev["after"]["step"] == 3 and [s["step"] for s in ev["steps"]] == [2]
    for label in ("before", "after"):
        assert set(ev[label]) == {"step", "new_task", "copy"}
        assert ev[label]["new_task"]["n"] == 2 and ev[label]["copy"]["n"] == 3
        assert 0.0 <= ev[label]["copy"]["accuracy"] <= 1.0
    eval_lines = [m for m in read_jsonl(run.metrics) if "eval_label" in m]
    assert [m["eval_label"] for m in eval_lines] == ["before", "teacher", "step", "after"]
    assert {"eval/new_task", "eval/copy"} <= set(eval_lines[0])
    assert run.read_status()["wall_seconds"] > 0

    sft = recipe_file(tmp_path, tiny_model_dir, tiny_data, "sft", method={"name": "sft"})
    assert cli("train", str(sft), cwd=tmp_path).returncode == 0
    res = cli("compare", "sdft", "sft", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:5] == ["run", "method", "teacher", "state", "steps"]
    assert "new_task" in lines[0] and "copy" in lines[0] and "peak MB" in lines[0]
    assert lines[2].startswith("sdft") and " sdft " in lines[2] and " ema " in lines[2]
    assert lines[3].startswith("sft") and " completed " in lines[3]
    summary = run_summary(run)
    assert summary["after"] == {k: v["accuracy"] for k, v in ev["after"].items() if k != "step"}
    assert compare_table([run]).count("\n") >= 3

    res = cli("compare", "sdft", "nope", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert res.returncode == 2 and "not a run folder" in res.stderr


def test_eval_command_on_run_and_model(tiny_model_dir, tiny_data, tmp_path):
    path = recipe_file(tmp_path, tiny_model_dir, tiny_data, "r", train={"max_steps": 1, "eval_steps": None})
    assert cli("train", str(path), "eval.before=false", cwd=tmp_path).returncode == 0
    ev = read_eval(RunFolder(tmp_path / "runs" / "r"))
    assert "before" not in ev and "after" in ev

    out = tmp_path / "res.json"
    res = cli("eval", "r", str(path), "--runs-dir", str(tmp_path / "runs"), "--json", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    stand_alone = json.loads(out.read_text())["r"]
    # The same adapter evaluated alone gives the same greedy accuracies as at the end of training.
    assert {k: v["accuracy"] for k, v in stand_alone.items()} == {
        k: v["accuracy"] for k, v in ev["after"].items() if k != "step"
    }
    res = cli("eval", str(tiny_model_dir), str(path), cwd=tmp_path)
    assert res.returncode == 0 and "new_task" in res.stdout and "copy" in res.stdout


def test_check_command_reports_gap(tiny_model_dir, tiny_data, tmp_path):
    path = recipe_file(tmp_path, tiny_model_dir, tiny_data, "r")
    res = cli("check", str(path), "--limit", "4", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "student (plain prompt)" in res.stdout and "teacher (prompt + demonstration)" in res.stdout
    assert "on 4 training rows" in res.stdout


def test_eval_with_bad_probe_fails_before_loading_model(tiny_model_dir, tiny_data, tmp_path):
    path = recipe_file(tmp_path, tiny_model_dir, tiny_data, "r")
    write_jsonl(tmp_path / "probe.jsonl", [{"question": "copy ab", "answer": "ab"}])
    res = cli("train", str(path), cwd=tmp_path)
    assert (
        res.returncode == 2 and "eval.probes[0].prompt_column" in res.stderr and "Traceback" not in res.stderr
    )
    assert not (tmp_path / "runs" / "r").exists()  # checked before the run folder is made

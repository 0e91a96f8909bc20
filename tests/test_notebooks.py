"""Notebooks are valid, their Python compiles, and every recipe they name exists and validates."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sdft_lite.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _python(source: str) -> str:
    # Shell escapes (`!cmd`) are IPython syntax: keep the indentation, replace the command.
    return "\n".join(re.sub(r"^(\s*)!.*$", r"\1pass", line) for line in source.splitlines())


def test_notebooks_compile_and_name_real_recipes():
    assert NOTEBOOKS, "no notebooks found"
    for nb_path in NOTEBOOKS:
        nb = json.loads(nb_path.read_text())
        assert nb["nbformat"] == 4
        code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
        assert code and all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
        for src in code:
            compile(_python(src), str(nb_path), "exec")
        for recipe in sorted(set(re.findall(r"recipes/[\w.-]+\.yaml", "\n".join(code)))):
            assert (ROOT / recipe).exists(), f"{nb_path.name} names {recipe}, which does not exist"
            load_recipe(ROOT / recipe)


def _code_cells(nb_path: Path) -> list[str]:
    return [
        "".join(c["source"]) for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "code"
    ]


# Importing any of these imports torch into the kernel.
TORCH_IMPORT = re.compile(r"^\s*(import|from)\s+(torch|transformers|peft|trl|unsloth|sdft_lite\.)", re.M)
PIP_INSTALL = re.compile(r"pip[\"',\s]+install|pip install")


def test_notebooks_install_before_torch_is_imported():
    """On Colab the install may replace torch: it must run before the kernel imports torch, compare
    torch's version in a subprocess before and after, and restart the runtime when it changed."""
    for nb_path in NOTEBOOKS:
        code = _code_cells(nb_path)
        installs = [i for i, src in enumerate(code) if PIP_INSTALL.search(src)]
        imports = [i for i, src in enumerate(code) if TORCH_IMPORT.search(_python(src))]
        assert installs, f"{nb_path.name}: no cell installs sdft-lite"
        assert imports, f"{nb_path.name}: no cell imports torch (this check would be empty)"
        assert installs[0] < imports[0], (
            f"{nb_path.name}: code cell {imports[0]} imports torch before the install in cell {installs[0]}"
        )
        install = code[installs[0]]
        assert "sys.executable" in install and "version('torch')" in install, "torch compared in a subprocess"
        assert "os.kill(os.getpid(), 9)" in install, "Colab's restart when torch changed"


def test_notebooks_get_the_code_without_an_assert():
    """A fresh Colab runtime has no checkout and no SDFT_LITE_REPO: the notebook clones the
    project's Repository URL (pyproject.toml [project.urls]) by itself, the override kept."""
    repository = re.search(
        r'^Repository\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M
    )
    assert repository, "pyproject.toml has no [project.urls] Repository"
    for nb_path in NOTEBOOKS:
        code = "\n".join(_code_cells(nb_path))
        assert not re.search(r"^\s*assert\b.*(URL|url|REPO)", code, re.M), f"{nb_path.name} asserts on a URL"
        if "git" in code and "clone" in code:
            assert f'os.environ.get("SDFT_LITE_REPO", "{repository.group(1)}")' in code, nb_path.name


FAKE_PIP = """
import os, pathlib, sys
with open(os.environ["FAKE_PIP_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_PIP_CHANGES_TORCH") == "1":  # as an install that replaces Colab's torch
    dist = pathlib.Path(os.environ["FAKE_SITE"]) / "torch-99.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\\nName: torch\\nVersion: 99.0\\n")
"""


def test_colab_setup_cell_clones_installs_and_restarts_when_torch_changed(tmp_path):
    """The first code cell of quickstart.ipynb, run as a fresh Colab runtime would (no checkout,
    COLAB_RELEASE_TAG set), with `python -m pip` replaced by a stand-in that records its arguments
    and, the first time, installs a different torch version: the cell clones the repository (here
    from this checkout, through SDFT_LITE_REPO), installs, and kills its own kernel (Colab then
    restarts it). Run again, it clones and installs nothing new and carries on."""
    import os
    import subprocess
    import sys

    setup = _code_cells(ROOT / "notebooks" / "quickstart.ipynb")[0]
    site = tmp_path / "site"
    (site / "pip").mkdir(parents=True)
    (site / "pip" / "__init__.py").write_text("")
    (site / "pip" / "__main__.py").write_text(FAKE_PIP)
    work = tmp_path / "content"
    work.mkdir()
    log = tmp_path / "pip.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "FAKE_SITE": str(site),
        "FAKE_PIP_LOG": str(log),
        "COLAB_RELEASE_TAG": "test",
        "SDFT_LITE_REPO": str(ROOT),
        "PATH": os.environ.get("PATH", ""),
    }

    def run_cell(**extra):
        return subprocess.run(
            [sys.executable, "-c", setup],
            cwd=work,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )

    first = run_cell(FAKE_PIP_CHANGES_TORCH="1")
    assert first.returncode == -9, (first.stdout, first.stderr[-2000:])  # os.kill(os.getpid(), 9)
    assert "to 99.0: the runtime must restart" in first.stdout and "Restarting the runtime" in first.stdout
    assert (work / "sdft-lite" / "sdft_lite").is_dir()
    second = run_cell()
    assert second.returncode == 0, second.stderr[-2000:]
    assert "sdft-lite installed (torch 99.0)" in second.stdout
    installs = log.read_text().splitlines()
    assert len(installs) == 2 and all(line.startswith("install -q -e .") for line in installs), installs

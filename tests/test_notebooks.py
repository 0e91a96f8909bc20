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

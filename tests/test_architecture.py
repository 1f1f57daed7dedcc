"""docs/architecture.md draws one supervised and one MAE training step as the files they pass through: every named
file and function exists, and each step touches at most 12 files."""
import ast
import re

import pytest

from tests.conftest import ROOT

DOC = ROOT / "docs" / "architecture.md"


def _rows(step: str) -> list[tuple[str, str, str]]:
    block = DOC.read_text().split(f"<!-- step: {step} -->", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| \d+ \| `([^`]+)` \| `([^`]+)` \| (.*) \|$", block, flags=re.M)


def _defines(path, name: str) -> bool:
    """Whether the file defines ``name`` (a function, or ``Class.method``)."""
    tree = ast.parse((ROOT / path).read_text())
    owner, _, attr = name.rpartition(".")
    for node in ast.walk(tree):
        if owner and isinstance(node, ast.ClassDef) and node.name == owner:
            return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == attr for n in node.body)
        if not owner and isinstance(node, ast.FunctionDef) and node.name == name:
            return True
    return False


@pytest.mark.parametrize("step", ["supervised", "mae"])
def test_the_drawn_step_names_real_files_and_functions_in_at_most_12_files(step):
    rows = _rows(step)
    assert len(rows) >= 8, rows
    files = set()
    for path, function, text in rows:
        assert (ROOT / path).is_file(), path
        assert _defines(path, function), f"{path} defines no {function}"
        files |= {path, *re.findall(r"`(siftguide/[\w/]+\.py)`", text)}
    assert all((ROOT / f).is_file() for f in files), files
    assert len(files) <= 12, sorted(files)

"""docs/changes.md: every old import it lists fails, every new one works (a user's script is fixed by the table)."""
import importlib
import re

import pytest

from tests.conftest import ROOT


def _pairs():
    block = (ROOT / "docs" / "changes.md").read_text().split("<!-- imports -->", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `([\w.]+)` \| `([\w.]+)` \|$", block, flags=re.M)


def _resolve(dotted: str):
    """The object ``a.b.c.Name`` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_the_page_lists_renames():
    assert len(_pairs()) >= 20


@pytest.mark.parametrize("old, new", _pairs())
def test_old_names_are_gone_and_new_ones_import(old, new):
    assert _resolve(new) is not None
    with pytest.raises((ImportError, AttributeError)):
        _resolve(old)

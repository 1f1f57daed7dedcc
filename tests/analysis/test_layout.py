"""siftguide.analysis keeps one concept per file: small files, no import of another module's private names."""
import ast
from pathlib import Path

import siftguide
from tests.conftest import ROOT

PKG = Path(siftguide.__file__).parent


def test_analysis_files_are_small_and_import_no_private_names():
    for f in sorted((PKG / "analysis").glob("*.py")):
        assert len(f.read_text().splitlines()) <= 450, f"{f.name} is over 450 lines"
    offenders = [f"{f.relative_to(f.parents[1])}: from {'.' * n.level}{n.module or ''} import {a.name}"
                 for f in [*(PKG / "analysis").glob("*.py"), ROOT / "tests" / "oracle.py"]
                 for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.ImportFrom)
                 for a in n.names if a.name.startswith("_") and a.name != "__future__" and n.module != "__future__"]
    assert not offenders, offenders

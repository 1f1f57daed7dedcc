"""The package's shape: one name per concept (no compatibility layer, no old names), nothing outside analysis/
imports analysis/, __init__ files hold no logic, the module stays small."""
import ast
import re
from pathlib import Path

import siftguide
from tests.conftest import ROOT

PKG = Path(siftguide.__file__).parent
OLD_NAMES = re.compile(r"compat|RelevanceSource|RelevanceTarget|SiftGuidance|last_terms|last_fallback")


def _modules(top: Path):
    return sorted(p for p in top.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_old_names_in_the_package_or_its_tests():
    hits = [f"{p.relative_to(ROOT)}:{i}" for top in (PKG, ROOT / "tests") for p in _modules(top)
            if p != Path(__file__) for i, line in enumerate(p.read_text().splitlines(), 1) if OLD_NAMES.search(line)]
    assert not hits, hits


def _imports(path: Path) -> list[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(filter(None, [base, node.module or ""]))
            out += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return out


def test_nothing_outside_analysis_imports_analysis():
    offenders = [str(p.relative_to(PKG)) for p in _modules(PKG) if "analysis" not in p.relative_to(PKG).parts
                 and any(m == "siftguide.analysis" or m.startswith("siftguide.analysis.") for m in _imports(p))]
    assert not offenders, offenders


def test_init_files_hold_no_logic_and_the_module_stays_small():
    for init in PKG.rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        assert len(init.read_text().splitlines()) <= 40, init
        logic = [type(n).__name__ for n in tree.body if isinstance(n, (ast.ClassDef, ast.For, ast.While, ast.With))]
        assert not logic, (init, logic)
    assert len((PKG / "module.py").read_text().splitlines()) <= 180

"""siftguide.analysis keeps one concept per file: small files, no import of another module's private names, and the
public names still importable from where they were before the split."""
import ast
from pathlib import Path

import siftguide
from tests.conftest import ROOT

PKG = Path(siftguide.__file__).parent


def test_analysis_files_are_small_and_import_no_private_names():
    for f in sorted((PKG / "analysis").glob("*.py")):
        assert len(f.read_text().splitlines()) <= 450, f"{f.name} is over 450 lines"
    offenders = [f"{f.relative_to(f.parents[1])}: from {'.' * n.level}{n.module or ''} import {a.name}"
                 for f in [*(PKG / "analysis").glob("*.py"), ROOT / "tests" / "oracle.py", PKG / "compare.py"]
                 for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.ImportFrom)
                 for a in n.names if a.name.startswith("_") and a.name != "__future__" and n.module != "__future__"]
    assert not offenders, offenders


def test_public_names_importable_from_their_old_homes():
    from siftguide.analysis import analyze, compare, export, images, interrelation, loading, metrics, plots

    assert analyze.spearman is metrics.spearman and analyze.InterrelationStats is interrelation.InterrelationStats
    assert analyze.load_checkpoint_model is loading.load_checkpoint_model
    assert analyze.plot_overlays is plots.plot_overlays
    assert analyze.dataset_source is images.dataset_source and callable(analyze.main)
    assert export.load_run_checkpoint is loading.load_run_checkpoint and export.ExportError is loading.CheckpointError
    assert all(hasattr(compare, n) for n in compare.__all__) and all(hasattr(analyze, n) for n in analyze.__all__)
    from siftguide import analyze as analyze_cmd, export as export_cmd

    assert analyze_cmd.main is analyze.main and export_cmd.main is export.main

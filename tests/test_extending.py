"""Extension points (docs/extending.md): a new guidance mode is one ``.py`` plus one ``.yaml``, with no edit of the
package; the code excerpts on the page are the code's. The composite's generic contract (declared hooks only, hook
points): tests/guidance/test_composite.py."""
import collections
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pandas as pd
import torch

from siftguide.train import train
from tests.conftest import ROOT


DOC = ROOT / "docs" / "extending.md"


def doc_blocks(kind: str) -> list[tuple[str, str]]:
    """``(path, code)`` of the fenced blocks after ``<!-- kind: path -->`` in docs/extending.md."""
    return re.findall(rf"<!-- {kind}: (\S+) -->\n```\w*\n(.*?)```", DOC.read_text(), flags=re.S)


def test_docs_excerpts_match_the_code():
    excerpts = doc_blocks("excerpt")
    assert len(excerpts) >= 5
    for path, code in excerpts:
        lines = (ROOT / path).read_text().splitlines()
        at = 0
        for line in code.rstrip().splitlines():
            if line == "...":  # elision: the next lines come later in the file
                continue
            assert line in lines[at:], f"docs/extending.md quotes {path}, which has no line {line!r} (in order)"
            at += lines[at:].index(line) + 1


def test_a_new_mode_is_one_py_and_one_yaml(tiny_cfg, tmp_path, monkeypatch, request):
    files = dict(doc_blocks("file"))
    assert set(files) == {"toy_mode.py", "guidance/toy.yaml"}
    assert importlib.util.find_spec("toy_mode") is None  # nothing installed under the toy's name
    code, conf = tmp_path / "code", tmp_path / "conf"
    (conf / "guidance").mkdir(parents=True)
    code.mkdir()
    (code / "toy_mode.py").write_text(files["toy_mode.py"])
    (conf / "guidance" / "toy.yaml").write_text(files["guidance/toy.yaml"])
    monkeypatch.syspath_prepend(str(code))
    request.addfinalizer(lambda: sys.modules.pop("toy_mode", None))
    toy = importlib.import_module("toy_mode")  # the module Hydra's _target_ then finds
    calls, results = collections.Counter(), collections.defaultdict(list)
    for hook in ("check", "forward_context", "loss_terms", "logs"):  # count the calls the package makes
        def counted(self, *a, _real=getattr(toy.ToyMode, hook), _hook=hook, **k):
            calls[_hook] += 1
            out = _real(self, *a, **k)
            results[_hook].append(out)
            return out
        monkeypatch.setattr(toy.ToyMode, hook, counted)

    cfg = tiny_cfg([f"hydra.searchpath=[file://{conf}]", "guidance=[prior,toy]", "trainer.max_steps=3",
                    "callbacks.knn=null"], name="toy")
    assert cfg.guidance.toy.weight == 0.5 and "prior" in cfg.guidance
    train(cfg)
    assert calls["check"] == 1 and calls["loss_terms"] == 3 and calls["logs"] == 3
    assert calls["forward_context"] >= 3 + 1  # the 3 training steps and the validation forwards
    assert all(loss.requires_grad for loss, _, _ in results["loss_terms"])  # its term reaches the net's weights
    m = pd.read_csv(Path(cfg.paths.output_dir) / "metrics.csv")
    steps = m.dropna(subset=["train/guidance/toy_loss"])
    assert len(steps) == 3 and (steps["train/guidance/toy_loss"] > 0).all()
    assert (steps["train/guidance/toy_weight"] == 0.5).all() and steps["train/guidance/toy_peak"].between(0, 1).all()
    assert steps["train/guidance/prior_beta"].notna().all()  # composed with a packaged mode
    # the toy term is what the step optimised on top of the task loss (the prior adds no term)
    torch.testing.assert_close(torch.tensor(steps["train/guidance_loss"].values),
                               torch.tensor(steps["train/guidance/toy_loss"].values))
    torch.testing.assert_close(torch.tensor(steps["train/loss"].values),
                               torch.tensor((steps["train/task_loss"] + steps["train/guidance_loss"]).values))

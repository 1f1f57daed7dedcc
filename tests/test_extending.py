"""Extension points (docs/extending.md): a new guidance mode is one ``.py`` plus one ``.yaml``, with no edit of the
package; the composite calls declared hooks only; an objective-side mode plugs into a declared hook point. The toy
mode and the code excerpts are read from docs/extending.md, so the page stays true."""
import collections
import contextlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

from siftguide.guidance import BIAS, CAPTURE, Guidance, GuidanceMode, KeypointMasking, TokenDrop
from siftguide.objectives import MAEObjective, SupervisedObjective
from tests.conftest import ROOT

from siftguide.train import train

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
    for hook in ("bind", "forward_context", "loss_terms", "logs"):  # count the calls the package makes
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
    assert calls["bind"] == 1 and calls["loss_terms"] == 3 and calls["logs"] == 3
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


# ---------------------------------------------------------------------------------------- the composite's contract
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                             depth=2, embed_dim=32, num_heads=2, in_chans=1)


class Recorder(GuidanceMode):
    """Records the order in which the composite enters its forward context."""

    def __init__(self, label, order, log):
        self.name, self.forward_order, self.log = label, order, log

    @contextlib.contextmanager
    def forward_context(self, relevance, stage, step, ids_keep=None):
        self.log.append(self.name)
        yield self


def test_forward_contexts_enter_in_declared_order():
    log = []
    g = Guidance(vit(), {"capture": Recorder("capture", CAPTURE, log), "bias": Recorder("bias", BIAS, log),
                         "capture2": Recorder("capture2", CAPTURE, log)})
    with g.forward(None, "train"):
        pass
    assert log == ["bias", "capture", "capture2"]  # bias first; ties keep the modes' order


def test_token_selection_and_hook_points_are_checked_generically():
    net = vit()

    class Selector(GuidanceMode):
        name, selects_tokens = "selector", True

        def select_tokens(self, relevance, step):
            return torch.arange(4).expand(relevance.shape[0], 4)

    with pytest.raises(ValueError, match="at most one token-selecting"):
        Guidance(net, {"token_drop": TokenDrop(net), "selector": Selector()})
    rel = torch.full((2, 4, 4), 1 / 16)
    assert torch.equal(Guidance(net, {"selector": Selector()}).select_tokens(rel), torch.arange(4).expand(2, 4))
    with pytest.raises(ValueError, match="selector cannot serve"):
        Guidance(net, {"selector": Selector()}).bind(MAEObjective(decoder_dim=16, decoder_depth=1, decoder_heads=2))

    class FirstPatches(GuidanceMode):
        """An objective-side mode for an existing hook point: MAE shows the first ``keep`` patches."""

        name, acts_in, objective_hook = "first_patches", "objective", "masking"

        def __call__(self, relevance, keep):
            b, p = relevance.shape[0], relevance.flatten(1).shape[1]
            mask = torch.ones(b, p)
            mask[:, :keep] = 0.0
            return torch.arange(keep).expand(b, keep), mask

    with pytest.raises(ValueError, match="both plug into the objective's hook point 'masking'"):
        Guidance(net, {"masking": KeypointMasking(), "first": FirstPatches()})
    with pytest.raises(ValueError, match="hook point 'masking'.*SupervisedObjective does not declare"):
        Guidance(net, {"first": FirstPatches()}).bind(SupervisedObjective())
    obj = MAEObjective(decoder_dim=16, decoder_depth=1, decoder_heads=2)
    obj.setup(net)
    Guidance(net, {"first": FirstPatches()}).bind(obj)  # no setter on the objective for this mode
    assert isinstance(obj.hook("masking"), FirstPatches) and obj.hook("patch_weighting") is None
    out = obj(net, torch.rand(2, 1, 32, 32), {"relevance": rel}, "train")
    assert torch.equal(out.ids_keep, torch.arange(4).expand(2, 4))
    obj.set_masking(None)  # the former setters stay, as aliases of set_hook
    assert obj.hook("masking") is None
    with pytest.raises(ValueError, match="no hook point 'nope'"):
        obj.set_hook("nope", FirstPatches())

"""siftguide.guidance.composite: inert modes are bit-identical to the baseline, forward contexts enter in the
declared order, token selection and objective hook points are checked generically, modes an objective cannot
serve are errors."""
import contextlib
import copy

import pytest
import torch

from siftguide.guidance import (BIAS, CAPTURE, AttentionPrior, BackgroundSuppression, Guidance, GuidanceMode,
                                KeypointMasking, KeypointReconWeight, PatchInterrelation, SiftGuidance, TokenDrop)
from siftguide.objectives import MAEObjective, SupervisedObjective
from siftguide.relevance import RelevanceSource
from tests.helpers import corner_relevance


def step(net, guidance, objective, x, y, rel):
    """One optimizer step as PretrainModule.training_step takes it; returns the total loss."""
    batch = {"image": x, "label": y, "relevance": rel}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    keep = guidance.select_tokens(rel) if guidance is not None else None
    ctx = guidance.forward(rel, "train", keep) if guidance is not None else contextlib.nullcontext()
    with ctx:
        out = objective(net, x, batch, "train", keep=keep)
    loss = out.loss
    if guidance is not None:
        extra, _ = guidance.losses(rel, out.ids_keep)
        loss = loss if extra is None else loss + extra
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def test_inert_modes_are_bit_identical_to_the_baseline(tiny_vit):
    x, y, rel = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 0]), corner_relevance()
    base = tiny_vit()
    net = copy.deepcopy(base)
    obj = SupervisedObjective()
    obj.setup(net)
    guidance = Guidance(net, {
        "attention": SiftGuidance(net, weight=0.0), "interrelation": PatchInterrelation(net, weight=0.0),
        "background": BackgroundSuppression(net, weight=0.0), "prior": AttentionPrior(net, beta=0.0),
        "token_drop": TokenDrop(net, keep=1.0),
    })
    assert not guidance.active and not guidance.needs_relevance("train")
    for _ in range(2):
        a = step(base, None, obj, x, y, rel)
        b = step(net, guidance, obj, x, y, rel)
        assert torch.equal(a, b)
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), net.parameters()))
    # the global weight 0 silences active loss modes too
    g0 = Guidance(net, {"attention": SiftGuidance(net, weight=1.0)}, weight=0.0)
    assert not g0.active


def test_modes_an_objective_cannot_serve_are_errors(tiny_vit):
    net = tiny_vit()
    sup, mae = SupervisedObjective(), MAEObjective(decoder_dim=16, decoder_depth=1, decoder_heads=2)
    with pytest.raises(ValueError, match="objective=mae"):
        Guidance(net, {"masking": KeypointMasking()}).bind(sup)
    with pytest.raises(ValueError, match="objective=mae"):
        Guidance(net, {"recon_weight": KeypointReconWeight()}).bind(sup)
    with pytest.raises(ValueError, match="token_drop cannot serve"):
        Guidance(net, {"token_drop": TokenDrop(net)}).bind(mae)
    with pytest.raises(ValueError, match="out of range"):
        SiftGuidance(net, layers=[5])
    with pytest.raises(ValueError, match="out of range"):
        PatchInterrelation(net, heads=[7])
    with pytest.raises(ValueError, match="unknown relevance kind"):
        RelevanceSource("nope")
    with pytest.raises(ValueError, match="beta"):
        AttentionPrior(net, beta=-1)


class Recorder(GuidanceMode):
    """Records the order in which the composite enters its forward context."""

    def __init__(self, label, order, log):
        self.name, self.forward_order, self.log = label, order, log

    @contextlib.contextmanager
    def forward_context(self, relevance, stage, step, ids_keep=None):
        self.log.append(self.name)
        yield self


def test_forward_contexts_enter_in_declared_order(tiny_vit):
    log = []
    g = Guidance(tiny_vit(), {"capture": Recorder("capture", CAPTURE, log), "bias": Recorder("bias", BIAS, log),
                         "capture2": Recorder("capture2", CAPTURE, log)})
    with g.forward(None, "train"):
        pass
    assert log == ["bias", "capture", "capture2"]  # bias first; ties keep the modes' order


def test_token_selection_and_hook_points_are_checked_generically(tiny_vit):
    net = tiny_vit()

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

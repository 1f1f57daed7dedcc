"""siftguide.guidance.composite: inert modes are bit-identical to the baseline, forward contexts enter in the
declared order, token selection and patch weights are handed to the objective generically, modes an objective
cannot serve are errors."""
import contextlib
import copy

import pytest
import torch

from siftguide.guidance import (BIAS, CAPTURE, AttentionPrior, BackgroundSuppression, Guidance, GuidanceMode,
                                KeypointMasking, KeypointReconWeight, PatchInterrelation, AttentionAlignment, TokenDrop)
from siftguide.objectives import Guided, MAEObjective, SupervisedObjective
from siftguide.relevance import RelevanceStage
from tests.helpers import corner_relevance


def step(net, guidance, objective, x, y, rel):
    """One optimizer step as PretrainModule.training_step takes it; returns the total loss."""
    batch = {"image": x, "label": y, "relevance": rel}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    keep = guidance.select_tokens(rel, 0) if guidance is not None else None
    ctx = guidance.forward(rel, "train", 0, keep) if guidance is not None else contextlib.nullcontext()
    with ctx:
        out = objective(net, x, batch, "train", Guided(keep))
    loss = out.loss
    if guidance is not None:
        extra, _ = guidance.losses(rel, 0, out.ids_keep)
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
        "attention": AttentionAlignment(net, weight=0.0), "interrelation": PatchInterrelation(net, weight=0.0),
        "background": BackgroundSuppression(net, weight=0.0), "prior": AttentionPrior(net, beta=0.0),
        "token_drop": TokenDrop(net, keep_ratio=1.0),
    })
    assert not guidance.active and not guidance.needs_relevance("train")
    for _ in range(2):
        a = step(base, None, obj, x, y, rel)
        b = step(net, guidance, obj, x, y, rel)
        assert torch.equal(a, b)
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), net.parameters()))
    # the global weight 0 silences active loss modes too
    g0 = Guidance(net, {"attention": AttentionAlignment(net, weight=1.0)}, weight=0.0)
    assert not g0.active


def test_modes_an_objective_cannot_serve_are_errors(tiny_vit):
    net = tiny_vit()
    sup, mae = SupervisedObjective(), MAEObjective(decoder_dim=16, decoder_depth=1, decoder_heads=2)
    with pytest.raises(ValueError, match="objective=mae"):
        Guidance(net, {"masking": KeypointMasking()}).check(sup)
    with pytest.raises(ValueError, match="objective=mae"):
        Guidance(net, {"recon_weight": KeypointReconWeight()}).check(sup)
    with pytest.raises(ValueError, match="token_drop cannot serve"):
        Guidance(net, {"token_drop": TokenDrop(net)}).check(mae)
    with pytest.raises(ValueError, match="out of range"):
        AttentionAlignment(net, layers=[5])
    with pytest.raises(ValueError, match="out of range"):
        PatchInterrelation(net, heads=[7])
    with pytest.raises(ValueError, match="unknown relevance.kind"):
        RelevanceStage("nope")
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
    with g.forward(None, "train", 0):
        pass
    assert log == ["bias", "capture", "capture2"]  # bias first; ties keep the modes' order


def test_token_selection_and_patch_weights_reach_the_objective_generically(tiny_vit):
    """A new mode is one class: the composite hands its tokens and weights to any objective that offers them."""
    net = tiny_vit()

    class FirstPatches(GuidanceMode):
        """Shows the first ``count`` patches of a masked objective (or 4 where the mode chooses)."""

        name, selects_tokens, requires = "first_patches", True, "masked_tokens"

        def select_tokens(self, relevance, step, count=None):
            return torch.arange(count or 4).expand(relevance.shape[0], count or 4)

    class Heavy(GuidanceMode):
        name, weights_patches, requires = "heavy", True, "patch_weights"

        def patch_weights(self, relevance, step):
            return torch.full(relevance.flatten(1).shape, 2.0), "mask"

    with pytest.raises(ValueError, match="at most one token-selecting"):
        Guidance(net, {"token_drop": TokenDrop(net), "first": FirstPatches()})
    with pytest.raises(ValueError, match="at most one patch-weighting"):
        Guidance(net, {"recon_weight": KeypointReconWeight(), "heavy": Heavy()})
    rel = torch.full((2, 4, 4), 1 / 16)
    g = Guidance(net, {"first": FirstPatches(), "heavy": Heavy()})
    with pytest.raises(ValueError, match="first_patches cannot serve objective SupervisedObjective"):
        g.check(SupervisedObjective())
    obj = MAEObjective(decoder_dim=16, decoder_depth=1, decoder_heads=2)
    obj.setup(net)
    g.check(obj)
    ids = g.select_tokens(rel, 0, obj.visible_count(16))
    assert torch.equal(ids, torch.arange(4).expand(2, 4))
    x = torch.rand(2, 1, 32, 32)
    torch.manual_seed(0)
    plain = obj(net, x, {}, "train", Guided(ids))
    torch.manual_seed(0)
    weighted = obj(net, x, {}, "train", Guided(ids, *g.patch_weights(rel, 0)))
    assert torch.equal(plain.ids_keep, ids) and torch.equal(weighted.ids_keep, ids)
    torch.testing.assert_close(weighted.loss, 2 * plain.loss)  # every masked patch weighs 2, normalised by the mask
    with pytest.raises(ValueError, match="needs batch"):
        g.select_tokens(None, 0, 4)

"""siftguide.guidance.prior: the attention-logit bias shifts attention to relevant patches, decays on its
schedule and is off at evaluation."""
import pytest
import torch

from siftguide.guidance import AttentionPrior, AttentionAlignment
from tests.helpers import corner_relevance


def test_prior_shifts_attention_toward_relevant_patches(tiny_vit):
    net = tiny_vit().eval()
    x = torch.rand(2, 1, 32, 32)
    rel = corner_relevance(2)
    guide = AttentionAlignment(net, layers=[-1])
    prior = AttentionPrior(net, layers=[-1], beta=2.0)

    def mass():
        with torch.no_grad(), guide.capture():
            net(x)
        a = guide.patch_attention()[1]
        guide.clear()
        return a[:, [0, 1, 4, 5]].sum(1)

    before = mass()
    with prior.apply(rel, step=0):
        after = mass()
    assert (after > before + 0.2).all(), (before, after)
    with prior.apply(torch.full((2, 4, 4), 1 / 16), step=0):  # uniform relevance: no change (bias 0 everywhere
        same = mass()                                          # but log(1 + eps), constant over patches)
    # a constant bias on patches but not on CLS shifts mass between CLS and patches only; the patch distribution
    # (renormalised) is unchanged
    torch.testing.assert_close(same, before, rtol=1e-4, atol=1e-5)
    assert torch.equal(mass(), before)  # outside the context the model is untouched


def test_prior_schedule_decays_and_is_off_at_eval(tiny_vit):
    net = tiny_vit()
    prior = AttentionPrior(net, beta=1.0, schedule=dict(kind="cosine", total_steps=10))
    assert prior.current_beta(0) == 1.0 and prior.current_beta(10) == pytest.approx(0.0)
    assert prior.needs_relevance("train") and not prior.needs_relevance("val")
    assert AttentionPrior(net, at_eval=True).needs_relevance("val")


def test_prior_decays_over_a_fraction_of_the_run_from_the_config(tiny_cfg, tiny_vit):
    from hydra.utils import instantiate

    cfg = tiny_cfg(["guidance=prior", "trainer.max_steps=300", "guidance.prior.schedule.fraction=0.5"])
    prior = instantiate(cfg.guidance.prior)(tiny_vit())
    assert prior.current_beta(75) == pytest.approx(0.5) and prior.current_beta(150) == 0.0
    assert instantiate(tiny_cfg(["guidance=prior", "trainer.max_steps=300"], name="full").guidance.prior)(
        tiny_vit()).current_beta(150) == pytest.approx(0.5)  # default: over the whole run

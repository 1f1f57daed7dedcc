"""siftguide.guidance.schedule: the guidance schedules, and one cosine shared with the learning rate."""
import pytest

from siftguide import AttentionAlignment
from siftguide.guidance import GuidanceSchedule


def test_schedules(tiny_vit):
    assert GuidanceSchedule()(10_000) == 1.0
    lin = GuidanceSchedule("linear", total_steps=100)
    assert lin(0) == 1.0 and lin(50) == pytest.approx(0.5) and lin(100) == 0.0 and lin(500) == 0.0
    cos = GuidanceSchedule("cosine", total_steps=100, end_factor=0.2)
    assert cos(50) == pytest.approx(0.6) and cos(100) == pytest.approx(0.2)
    warm = GuidanceSchedule(warmup_steps=10)
    assert warm(0) == pytest.approx(0.1) and warm(9) == 1.0
    with pytest.raises(ValueError):
        GuidanceSchedule("linear")
    # fraction: the decay ends at fraction * total_steps, then stays at end_factor
    half = GuidanceSchedule("cosine", total_steps=300, fraction=0.5)
    assert half(75) == pytest.approx(0.5) and half(150) == 0.0 and half(299) == 0.0
    assert GuidanceSchedule("cosine", total_steps=150)(75) == pytest.approx(half(75))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            GuidanceSchedule("cosine", total_steps=300, fraction=bad)
    model = tiny_vit(in_chans=3, num_classes=5, depth=3, embed_dim=192, num_heads=3).eval()  # vit_tiny, RGB
    g = AttentionAlignment(model, weight=2.0, schedule=dict(kind="linear", total_steps=10))
    assert g.current_weight(5) == pytest.approx(1.0)


def test_one_cosine_for_the_guidance_schedule_and_the_learning_rate():
    """GuidanceSchedule and the LR multiplier share cosine_decay and compute exactly what they did before."""
    import math

    from siftguide.guidance.schedule import cosine_decay, warmup_cosine
    from siftguide.guidance.schedule import warmup_cosine as former_lr  # the LR schedule's former copy, still defined there

    for w, total, floor in [(50, 300, 0.01), (0, 10, 0.0), (5000, 100_000, 0.0), (10, 11, 0.5)]:
        new, old = warmup_cosine(w, total, floor), former_lr(w, total, floor)
        assert all(new(s) == old(s) for s in range(0, total + 20, max(1, total // 997)))  # bit for bit

    def former_guidance(kind, total, end, fraction, warmup, step):  # GuidanceSchedule.__call__ before
        f = 1.0
        if kind != "constant":
            t = min(max(step, 0) / (fraction * total), 1.0)
            decay = 1 - t if kind == "linear" else 0.5 * (1 + math.cos(math.pi * t))
            f = end + (1 - end) * decay
        if warmup > 0 and step < warmup:
            f *= (step + 1) / warmup
        return f

    for kind in ("constant", "linear", "cosine"):
        for total, end, fraction, warmup in [(300, 0.0, 0.5, 0), (100, 0.2, 1.0, 10), (7, 0.3, 0.3, 2)]:
            sched = GuidanceSchedule(kind, total_steps=total, end_factor=end, fraction=fraction, warmup_steps=warmup)
            assert all(sched(s) == former_guidance(kind, total, end, fraction, warmup, s) for s in range(total + 5))
    assert cosine_decay(-1.0) == 1.0 and cosine_decay(2.0, 0.2) == 0.2

"""siftguide.objectives.{dino_head, dino_loss, ibot_loss, momentum}: the DINO / iBOT building blocks against
loop-based references of lightly's formulas (centers after one and two calls, teacher temperature warm-up), known
values, the head's normalised last layer and frozen gradients, the EMA update and the schedules; bad settings fail."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from siftguide.objectives.dino_head import DINOProjectionHead
from siftguide.objectives.dino_loss import DINOLoss
from siftguide.objectives.ibot_loss import IBOTPatchLoss
from siftguide.objectives.momentum import cosine_schedule, linear_warmup_schedule, update_momentum

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def ref_dino(teacher, student, center, t_temp, s_temp=0.1):
    """lightly's / DINO's loss, one (teacher view, student view) pair at a time."""
    total, n_terms = 0.0, 0
    for i, t in enumerate(teacher):
        p = F.softmax((t - center) / t_temp, dim=-1)
        for j, s in enumerate(student):
            if i == j:
                continue
            total = total + (-p * F.log_softmax(s / s_temp, dim=-1)).sum(-1).mean()
            n_terms += 1
    return total / n_terms


def ref_ibot(teacher, student, mask, center, t_temp, s_temp=0.1):
    """lightly's / DINOv2's patch loss on the masked tokens, one image at a time: mean over its masked patches
    (0 without any), summed and divided by B."""
    total = 0.0
    for t, s, m in zip(teacher, student, mask):
        if m.any():
            p = F.softmax((t[m] - center) / t_temp, dim=-1)
            total = total + (-p * F.log_softmax(s[m] / s_temp, dim=-1)).sum(-1).mean()
    return total / len(teacher)


def views(gen, n, b=6, d=32, scale=3.0):
    return [torch.randn(b, d, generator=gen) * scale for _ in range(n)]


def test_dino_loss_matches_reference_with_center_and_temperature_warmup():
    gen = torch.Generator().manual_seed(0)
    loss_fn = DINOLoss(32, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_steps=4,
                       center_momentum=0.9)
    assert [round(loss_fn.teacher_temperature(s), 12) for s in range(6)] == [0.04, 0.05, 0.06, 0.07, 0.07, 0.07]
    center = torch.zeros(1, 32)
    for step in (0, 2):  # two calls: the second uses the center the first one left
        teacher, student = views(gen, 2), views(gen, 6)  # 2 global views, then 4 local ones for the student
        student = [s.requires_grad_() for s in student]
        loss = loss_fn(teacher, student, step=step)
        want = ref_dino(teacher, student, center, loss_fn.teacher_temperature(step))
        assert loss.shape == () and torch.allclose(loss, want, rtol=1e-6, atol=1e-6), (step, loss, want)
        center = 0.9 * center + 0.1 * torch.cat(teacher).mean(0, keepdim=True)
        assert loss_fn.center.shape == (1, 32) and torch.allclose(loss_fn.center, center, atol=1e-6), step
        loss.backward()
        assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    # the warm-up matters: at step 0 the loss is not the one at the final temperature
    teacher, student = views(gen, 2), views(gen, 2)
    warm = DINOLoss(32, 0.04, 0.07, warmup_teacher_temp_steps=4)(teacher, student, step=0)
    assert not torch.isclose(warm, ref_dino(teacher, student, 0.0, 0.07))
    assert DINOLoss(8, 0.04, 0.07, warmup_teacher_temp_steps=1).teacher_temperature(0) == 0.04  # linspace(.., 1)
    assert DINOLoss(8, 0.04, 0.07).teacher_temperature(0) == 0.07  # no warm-up


def test_dino_loss_known_value_and_no_teacher_gradient():
    # uniform teacher and student: cross-entropy log D for every pair
    loss_fn = DINOLoss(16)
    teacher = [torch.zeros(3, 16, requires_grad=True) for _ in range(2)]
    loss = loss_fn(teacher, [torch.zeros(3, 16, requires_grad=True) for _ in range(5)], step=0)
    assert torch.isclose(loss, torch.tensor(math.log(16)))
    loss.backward()
    assert all(t.grad is None for t in teacher)
    assert torch.equal(loss_fn.center, torch.zeros(1, 16))
    # a student view equal to its own teacher view is left out: one global view paired with itself only costs 0
    t = torch.randn(4, 16)
    same = DINOLoss(16)([t], [t * 10, torch.zeros(4, 16)], step=0)  # only the (0, 1) pair counts
    assert torch.isclose(same, torch.tensor(math.log(16)))


@pytest.mark.parametrize("kw, match", [(dict(output_dim=0), "output_dim"), (dict(teacher_temp=0.0), "teacher_temp"),
                                       (dict(warmup_teacher_temp=-1.0), "warmup_teacher_temp"),
                                       (dict(student_temp=0.0), "student_temp"),
                                       (dict(warmup_teacher_temp_steps=-1), "warmup_teacher_temp_steps"),
                                       (dict(center_momentum=1.5), "center_momentum")])
def test_dino_loss_rejects_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        DINOLoss(**{"output_dim": 8, **kw})


def test_dino_loss_rejects_bad_views():
    loss_fn = DINOLoss(8)
    with pytest.raises(ValueError, match=r"student_out\[1\] must have shape \(B, D\) = \(4, 8\)"):
        loss_fn([torch.zeros(4, 8)], [torch.zeros(4, 8), torch.zeros(3, 8)], step=0)
    with pytest.raises(ValueError, match=r"teacher_out\[0\] must have shape \(B, D\)"):
        loss_fn([torch.zeros(4, 7)], [torch.zeros(4, 8), torch.zeros(4, 8)], step=0)
    with pytest.raises(ValueError, match="views"):
        loss_fn([torch.zeros(4, 8)], [torch.zeros(4, 8)], step=0)  # no pair left
    with pytest.raises(ValueError, match="views"):
        loss_fn([torch.zeros(4, 8)] * 2, [torch.zeros(4, 8)], step=0)  # fewer student than teacher views
    with pytest.raises(ValueError, match="lists"):
        loss_fn(torch.zeros(2, 4, 8), [torch.zeros(4, 8)] * 2, step=0)


def test_ibot_loss_matches_reference_with_center_and_counts_unmasked_images():
    gen = torch.Generator().manual_seed(1)
    b, p, d = 4, 9, 16
    loss_fn = IBOTPatchLoss(d, teacher_temp=0.05, center_momentum=0.8)
    center = torch.zeros(1, d)
    for temp in (None, 0.07):  # two calls, the second with a per-call (warm-up) temperature
        mask = torch.rand(b, p, generator=gen) < 0.4
        mask[1] = False  # an image without masked patches: contributes 0, counts in the mean over B
        mask[0, 0] = True
        teacher = torch.randn(b, p, d, generator=gen) * 3
        student = torch.randn(b, p, d, generator=gen).requires_grad_()
        loss = loss_fn(teacher, student, mask, teacher_temp=temp)
        want = ref_ibot(teacher, student, mask, center, temp or 0.05)
        assert loss.shape == () and torch.allclose(loss, want, rtol=1e-6, atol=1e-6), (loss, want)
        center = 0.8 * center + 0.2 * teacher[mask].mean(0, keepdim=True)  # mean over the masked tokens
        assert loss_fn.center.shape == (1, d) and torch.allclose(loss_fn.center, center, atol=1e-6)
        loss.backward()
        assert student.grad[~mask].abs().max() == 0 and student.grad[mask].abs().sum() > 0
    # known value: uniform outputs cost log D per masked image, 0 per unmasked one, averaged over all B images
    mask = torch.zeros(4, 3, 3, dtype=torch.bool)  # (B, Gh, Gw) masks are accepted too
    mask[0, 1, 1] = mask[2, 0] = True
    fresh = IBOTPatchLoss(d)
    uniform = fresh(torch.zeros(4, 9, d), torch.zeros(4, 9, d), mask)
    assert torch.isclose(uniform, torch.tensor(0.5 * math.log(d)))
    # nothing masked anywhere: loss 0 and the center is kept (not pulled toward 0)
    fresh.center.fill_(1.0)
    none = fresh(torch.randn(4, 9, d), torch.randn(4, 9, d), torch.zeros(4, 9, dtype=torch.bool))
    assert none == 0 and torch.equal(fresh.center, torch.ones(1, d))


def test_ibot_loss_rejects_bad_inputs():
    with pytest.raises(ValueError, match="output_dim"):
        IBOTPatchLoss(0)
    with pytest.raises(ValueError, match="center_momentum"):
        IBOTPatchLoss(8, center_momentum=-0.1)
    loss_fn = IBOTPatchLoss(8)
    t, m = torch.zeros(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"teacher_out must have shape \(B, P, D\) with D = 8"):
        loss_fn(torch.zeros(2, 4, 7), torch.zeros(2, 4, 7), m)
    with pytest.raises(ValueError, match="student_out"):
        loss_fn(t, torch.zeros(2, 5, 8), m)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(B, P\) = \(2, 4\)"):
        loss_fn(t, t, m.float())
    with pytest.raises(ValueError, match="mask"):
        loss_fn(t, t, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="teacher_temp"):
        loss_fn(t, t, m, teacher_temp=0.0)


def test_dino_head_shapes_init_and_normalised_last_layer():
    torch.manual_seed(0)
    head = DINOProjectionHead(48, hidden_dim=64, bottleneck_dim=16, output_dim=100)
    assert head(torch.randn(5, 48)).shape == (5, 100) and head(torch.randn(2, 7, 48)).shape == (2, 7, 100)
    assert DINOProjectionHead(48, 64, 16, 100, batch_norm=True)(torch.randn(2, 7, 48)).shape == (2, 7, 100)
    first = head.layers[0]
    assert 0.015 < first.weight.std() < 0.025 and torch.equal(first.bias, torch.zeros(64))  # trunc normal, std .02
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones(100, 1))
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        head(torch.randn(8, 48)).logsumexp(-1).mean().backward()
        opt.step()
    row_norms = head.last_layer.weight.norm(dim=1)  # W = g V / ||V||: rows stay unit vectors
    assert torch.allclose(row_norms, torch.ones(100), atol=1e-5) and torch.equal(g, torch.ones(100, 1))
    out = head(torch.randn(8, 48))
    assert out.abs().max() <= 1 + 1e-5  # cosine similarities to the prototypes
    free = DINOProjectionHead(48, 64, 16, 100, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    with pytest.raises(ValueError, match=r"\(B, 48\) or \(B, P, 48\)"):
        head(torch.randn(5, 47))
    with pytest.raises(ValueError, match="bottleneck_dim"):
        DINOProjectionHead(48, bottleneck_dim=0)


def test_dino_head_cancels_only_the_last_layer_gradients_before_freeze_steps():
    head = DINOProjectionHead(8, hidden_dim=16, bottleneck_dim=4, output_dim=10, norm_last_layer=False)
    last = set(map(id, head.last_layer.parameters()))
    for step, frozen in ((0, True), (2, True), (3, False), (7, False)):
        head.zero_grad(set_to_none=True)
        head(torch.randn(4, 8)).square().sum().backward()
        head.cancel_last_layer_gradients(step, freeze_steps=3)
        for p in head.parameters():
            if id(p) in last:
                assert (p.grad is None) == frozen, step
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, step


def test_update_momentum_copies_keeps_and_interpolates():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    student(torch.randn(8, 4))  # BatchNorm statistics != the teacher's
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    before = [p.detach().clone() for p in teacher.parameters()]
    update_momentum(student, teacher, 1.0)
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), before))
    assert all(torch.equal(a, b) for a, b in zip(teacher.buffers(), student.buffers()))  # buffers: always copied
    update_momentum(student, teacher, 0.3)
    for p, q, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(p, 0.3 * q + 0.7 * s, atol=1e-7)
    update_momentum(student, teacher, 0.0)
    assert all(torch.equal(p, s) for p, s in zip(teacher.parameters(), student.parameters()))
    with pytest.raises(ValueError, match="m must be in"):
        update_momentum(student, teacher, 1.5)
    with pytest.raises(ValueError, match="same architecture"):
        update_momentum(student, torch.nn.Linear(4, 4), 0.5)


def test_schedules_equal_lightlys_values():
    # lightly.utils.scheduler.cosine_schedule at these arguments (end - (end - start) * (cos(pi s / (n - 1)) + 1) / 2)
    assert cosine_schedule(0, 10, 0.996, 1.0) == 0.996
    assert cosine_schedule(3, 10, 0.996, 1.0) == pytest.approx(0.997, abs=1e-15)
    assert cosine_schedule(4, 10, 0.996, 1.0) == pytest.approx(0.9976527036446662, abs=1e-15)
    assert cosine_schedule(8, 10, 0.996, 1.0) == pytest.approx(0.9998793852415718, abs=1e-15)
    assert cosine_schedule(9, 10, 0.996, 1.0) == 1.0 and cosine_schedule(0, 1, 0.5, 2.0) == 2.0
    assert cosine_schedule(5, 100, 1.0, 0.0) == pytest.approx(0.9937194443381971, abs=1e-15)
    assert cosine_schedule(3, 10, 0.1, 0.9, period=8) == pytest.approx(0.782842712474619, abs=1e-15)
    assert cosine_schedule(4, 10, 0.1, 0.9, period=8) == pytest.approx(0.9, abs=1e-15)
    assert cosine_schedule(13, 10, 0.1, 0.9, period=8) == pytest.approx(0.7828427124746189, abs=1e-15)
    with pytest.warns(RuntimeWarning, match="exceeds max_steps"):
        assert cosine_schedule(12, 10, 0.996, 1.0) == 1.0
    for args, match in (((-1, 10, 0.0, 1.0), "step"), ((0, -1, 0.0, 1.0), "max_steps")):
        with pytest.raises(ValueError, match=match):
            cosine_schedule(*args)
    with pytest.raises(ValueError, match="period"):
        cosine_schedule(0, 10, 0.0, 1.0, period=0)
    # lightly.utils.scheduler.linear_warmup_schedule
    assert [linear_warmup_schedule(s, 30, 0.04, 0.07) for s in (0, 30, 31)] == [0.04, 0.07, 0.07]
    assert linear_warmup_schedule(15, 30, 0.04, 0.07) == pytest.approx(0.055, abs=1e-15)
    assert linear_warmup_schedule(29, 30, 0.04, 0.07) == pytest.approx(0.069, abs=1e-15)
    for args, match in (((0, -1, 0.04, 0.07), "warmup_steps"), ((-1, 3, 0.04, 0.07), "step"),
                        ((0, 3, -0.1, 0.07), "start_value"), ((0, 3, 0.0, 0.0), "end_value"),
                        ((0, 3, 0.08, 0.07), "start_value must be <= end_value")):
        with pytest.raises(ValueError, match=match):
            linear_warmup_schedule(*args)


@CUDA
def test_losses_and_head_run_on_cuda_without_host_syncs():
    dev = torch.device("cuda")
    head = DINOProjectionHead(16, 32, 8, 64).to(dev)
    dino, ibot = DINOLoss(64, 0.04, 0.07, 3).to(dev), IBOTPatchLoss(64).to(dev)
    teacher_head = copy.deepcopy(head)
    x = torch.randn(4, 5, 16, device=dev)
    mask = torch.rand(4, 5, device=dev) < 0.5
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = head(x)
        loss = dino([out[:, 0], out[:, 1]], [out[:, 0], out[:, 1], out[:, 2]], step=1) + ibot(out, out, mask)
        loss.backward()
        head.cancel_last_layer_gradients(0, 1)
        update_momentum(head, teacher_head, 0.99)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()

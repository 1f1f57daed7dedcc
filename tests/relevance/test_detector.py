"""siftguide.relevance.detector: batched SIFT detection, against OpenCV (exactly on a square, by agreement on
Fashion-MNIST and photos), shapes and dtypes, the refinement budgets, fp32 whatever the global precision, CUDA."""
import math

import numpy as np
import pytest
import torch

from siftguide import detect_keypoints, keypoint_patch_counts
from siftguide.relevance import SIFTDetector, counts_from_keypoints, gaussian_blur
from siftguide.relevance import detector as sift
from tests.conftest import blob_image
from tests.oracle import agreement, opencv_keypoints, photo_batch


def test_blob_detected_at_its_centre_and_scale():
    img = blob_image(64, center=(20.0, 40.0), sigma=3.0)
    kp = detect_keypoints(img)
    assert kp.valid.sum() >= 1
    best = kp.response[0].argmax()
    x, y = kp.xy[0, best].tolist()
    assert abs(x - 20) < 1.0 and abs(y - 40) < 1.0
    # a Gaussian blob of std s is a DoG extremum at scale ~ s (Lindeberg); SIFT scale is sigma in pixels
    assert 2.0 < float(kp.scale[0, best]) < 4.5


def test_square_gives_keypoints_at_its_corners_and_none_on_constant():
    # a 120 px bright square in a 160 px image: SIFT fires once near each corner, inside the square
    img = torch.full((1, 1, 160, 160), 0.1)
    img[:, :, 20:140, 20:140] = 0.9
    kp = detect_keypoints(img)
    pts = kp.xy[0][kp.valid[0]]
    corners = torch.tensor([[20.0, 20.0], [139.0, 20.0], [20.0, 139.0], [139.0, 139.0]])
    d = torch.cdist(corners, pts).min(dim=1).values
    assert (d < 22).all(), f"a corner has no keypoint nearby: {d}"
    assert ((pts > 20) & (pts < 140)).all(), "corner keypoints lie inside the square"
    flat = detect_keypoints(torch.full((2, 1, 64, 64), 0.5))
    assert not flat.valid.any()


def test_square_matches_opencv_exactly():
    cv2 = pytest.importorskip("cv2")
    img = torch.full((160, 160), 0.1)
    img[20:140, 20:140] = 0.9
    u8 = (img * 255).round().to(torch.uint8)
    ref = sorted({(round(k.pt[0], 1), round(k.pt[1], 1)) for k in cv2.SIFT_create().detect(u8.numpy(), None)})
    kp = detect_keypoints(u8.float()[None, None] / 255)
    ours = sorted((round(x, 1), round(y, 1)) for x, y in kp.xy[0][kp.valid[0]].tolist())
    assert ours == ref


def test_output_is_fixed_size_padded_and_sorted():
    img = blob_image(64, batch=3)
    kp = detect_keypoints(img, max_keypoints=40)
    for t in (kp.scale, kp.response, kp.valid, kp.octave):
        assert t.shape == (3, 40)
    assert kp.xy.shape == (3, 40, 2)
    r = torch.where(kp.valid, kp.response, -1.0)
    assert (r[:, :-1] >= r[:, 1:]).all()
    assert (kp.response[~kp.valid] == 0).all()


def test_batch_invariance():
    u8 = photo_batch(64, crops_per_photo=1)[:6]
    x = u8.float() / 255
    kb = detect_keypoints(x)
    for i in range(len(x)):
        ki = detect_keypoints(x[i : i + 1])
        assert torch.equal(kb.valid[i], ki.valid[0])
        v = kb.valid[i]
        torch.testing.assert_close(kb.xy[i][v], ki.xy[0][v], atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_and_autocast_compute_in_fp32(dtype):
    x = photo_batch(64, crops_per_photo=1)[:4].float() / 255
    ref = detect_keypoints(x)
    xd = x.to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kp = detect_keypoints(xd)
    assert kp.xy.dtype == torch.float32
    # half-precision inputs are rounded, so only compare the strong keypoints' locations
    if dtype == torch.float64:
        assert torch.equal(kp.valid, ref.valid)
    else:
        strong = ref.xy[ref.valid & (ref.response > 0.05)]
        d = torch.cdist(strong, kp.xy[kp.valid]).min(dim=1).values
        assert (d < 1.0).float().mean() > 0.9


def test_rgb_matches_grey_conversion():
    grey = photo_batch(64, crops_per_photo=1)[:2].float() / 255
    rgb = grey.expand(-1, 3, -1, -1)
    a, b = detect_keypoints(grey), detect_keypoints(rgb)
    assert torch.equal(a.valid, b.valid)


def test_shape_and_type_errors_name_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        detect_keypoints(torch.rand(64, 64))
    with pytest.raises(ValueError, match=r"C = 1 or 3"):
        detect_keypoints(torch.rand(1, 2, 64, 64))
    with pytest.raises(TypeError, match="float"):
        detect_keypoints(torch.zeros(1, 1, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="too small"):
        detect_keypoints(torch.rand(1, 1, 4, 4), upsample=False)
    with pytest.raises(ValueError, match="divisible"):
        keypoint_patch_counts(torch.rand(1, 1, 60, 64), patch_size=16)


def test_gaussian_blur_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    x = torch.rand(1, 1, 37, 50)
    for sigma in (0.8, 1.6, 3.1):
        ours = gaussian_blur(x, sigma)[0, 0].numpy()
        ref = cv2.GaussianBlur(x[0, 0].numpy(), (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
        np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_blocked_blur_on_long_axes_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    x = torch.rand(2, 1, 200, 331)  # both axes take the row-block path (>= _BLOCKED_MIN), one not a multiple of it
    for sigma in (1.25, 3.1):
        ours = gaussian_blur(x, sigma)[1, 0].numpy()
        ref = cv2.GaussianBlur(x[1, 0].numpy(), (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
        np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_candidate_budget_caps_refinement_and_checks_its_arguments():
    x = photo_batch(64, crops_per_photo=1)[:4].float() / 255
    full = detect_keypoints(x, max_keypoints=256)
    capped = detect_keypoints(x, max_keypoints=256, max_candidates=2)
    n_octaves = int(full.octave[full.valid].max()) + 1
    assert (capped.count() <= 2 * n_octaves).all() and (capped.count() <= full.count()).all()
    assert full.count().sum() > 2 * capped.count().sum()
    # the survivors of the cap are the strongest candidates, which the full run keeps too
    for i in range(len(x)):
        d = torch.cdist(capped.xy[i][capped.valid[i]], full.xy[i][full.valid[i]]).min(dim=1).values
        assert (d < 1e-4).all()
    with pytest.raises(ValueError, match="candidate_density"):
        detect_keypoints(x, candidate_density=0)


@pytest.mark.parametrize("size", [64, 128])
def test_step_budget_gives_the_keypoints_of_full_refinement(size, monkeypatch):

    x = photo_batch(size, crops_per_photo=1).float() / 255
    budgeted = detect_keypoints(x, max_keypoints=1024)
    monkeypatch.setattr(sift, "_STEP_BUDGET", (1.0,) * sift._MAX_INTERP_STEPS)  # every step on every slot
    full = detect_keypoints(x, max_keypoints=1024)
    assert torch.equal(budgeted.valid, full.valid) and int(full.count().sum()) > 10 * len(x)
    torch.testing.assert_close(budgeted.xy, full.xy, atol=0, rtol=0)
    torch.testing.assert_close(budgeted.scale, full.scale, atol=0, rtol=0)
    # a budget too small for the candidates that need more than one step rejects them, as non-convergence does
    monkeypatch.setattr(sift, "_STEP_BUDGET", (1.0,) + (1e-9,) * (sift._MAX_INTERP_STEPS - 1))
    starved = detect_keypoints(x, max_keypoints=1024)
    assert (starved.count() <= full.count()).all() and starved.count().sum() < full.count().sum()


@pytest.mark.slow
def test_compiled_detector_gives_the_same_keypoints():  # compiling takes ~2 minutes on 2 CPU cores
    from siftguide.relevance import compiled_detect_keypoints

    x = photo_batch(64, crops_per_photo=1)[:8].float() / 255
    compiled = compiled_detect_keypoints()
    compiled(x, max_keypoints=128)  # a shape's first call is eager (it fills the device constants)
    a, b = detect_keypoints(x, max_keypoints=128), compiled(x, max_keypoints=128)
    assert torch.equal(a.valid, b.valid)
    torch.testing.assert_close(b.xy, a.xy, atol=1e-3, rtol=0)
    torch.testing.assert_close(b.scale, a.scale, atol=1e-3, rtol=1e-4)


def test_compile_traces_one_graph_that_takes_the_constants_as_inputs():
    # what torch.compile (and relevance.backend=compile) sees: the whole detector as one graph, its blur matrices and
    # offsets read from the filled caches as inputs, not rebuilt in the graph on every call (arange, zeros,
    # index_put_: ~1,600 more nodes and CPU -> GPU copies), and no graph break (an `out=` view broke it into 14)
    import collections

    graphs = []

    def count(gm, inputs):
        graphs.append(collections.Counter(n.op if n.op != "call_function" else getattr(n.target, "__name__", "")
                                          for n in gm.graph.nodes))
        return gm.forward

    x = blob_image(size=32, batch=2)
    settings = (32, None, 0.01, 3, 1.6, 0.04, 10.0, True, True)
    ref = sift._detect(x, *settings)  # eager: fills the caches
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(sift._detect, backend=count, dynamic=False)(x, *settings)
    torch._dynamo.reset()
    assert len(graphs) == 1, "graph breaks"
    g = graphs[0]
    assert g["zeros"] == 0 and g["tensor"] == 0 and g["arange"] <= 8, g  # was 42 zeros, 110 tensor, 131 arange (64 px)
    assert g["placeholder"] > 10  # the image and the constants
    assert torch.equal(out.xy, ref.xy) and torch.equal(out.valid, ref.valid)


def test_agrees_with_opencv_on_fashion_mnist():
    from siftguide.data import load_fashion_mnist

    x, _ = load_fashion_mnist(split="test", download=False)
    x = torch.nn.functional.interpolate(x[:48].float() / 255, size=64, mode="bilinear", align_corners=False)
    u8 = (x * 255).round().to(torch.uint8)
    kp = detect_keypoints(u8.float() / 255)
    a = agreement(kp, opencv_keypoints(u8), (8, 8), 8)
    assert a["n_opencv"] > 15  # ~25 keypoints per garment at 64 px
    assert a["rho"] > 0.9 and a["recall"] > 0.95, a


@pytest.mark.parametrize("size,patch", [(64, 8), (128, 16)])
def test_agrees_with_opencv_on_photos(size, patch):
    u8 = photo_batch(size, crops_per_photo=1)
    kp = detect_keypoints(u8.float() / 255, max_keypoints=1024)
    a = agreement(kp, opencv_keypoints(u8), (size // patch, size // patch), patch)
    assert a["rho"] > 0.9 and a["recall"] > 0.95, a
    assert abs(a["n_ours"] - a["n_opencv"]) / a["n_opencv"] < 0.05


def test_detector_module_and_counts_helper():
    det = SIFTDetector(max_keypoints=16)
    kp = det(blob_image(64, batch=2))
    c = counts_from_keypoints(kp, (4, 4), 16)
    assert c.shape == (2, 4, 4) and "max_keypoints=16" in repr(det)
    assert math.isclose(float(c[0].sum()), float(kp.valid[0].sum()))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
def test_cuda_matches_cpu():
    x = photo_batch(64, crops_per_photo=1)[:8].float() / 255
    a, b = detect_keypoints(x), detect_keypoints(x.cuda())
    assert b.xy.is_cuda
    strong = a.xy[a.valid & (a.response > 0.03)]
    d = torch.cdist(strong, b.xy[b.valid].cpu()).min(dim=1).values
    assert (d < 0.1).float().mean() > 0.95


@CUDA
def test_no_host_sync_in_the_hot_path():
    from siftguide.relevance import RelevanceStage

    x = (photo_batch(64, crops_per_photo=1)[:8].float() / 255).cuda()
    target = RelevanceStage(sift=dict(max_keypoints=64))
    target(x, 8)  # warm-up builds the cached blur matrices (a one-time host -> device copy)
    torch.cuda.set_sync_debug_mode("error")
    try:
        target(x, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_detector_computes_in_fp32_whatever_the_matmul_precision(precision):
    """set_float32_matmul_precision("medium") makes CPU matmuls bf16 (oneDNN), "high" makes CUDA ones TF32: the
    banded-matmul blurs would then lose the keypoints (rho 0.55-0.82 against OpenCV). The detector forces fp32 and
    restores the user's setting."""
    from siftguide.precision import fp32_math

    x = photo_batch(64, crops_per_photo=1)[:8].float() / 255
    ref = detect_keypoints(x, max_keypoints=128)
    before = torch.get_float32_matmul_precision()
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    exact = a @ a
    try:
        torch.set_float32_matmul_precision(precision)
        reduced = a @ a
        got = detect_keypoints(x, max_keypoints=128)
        assert torch.equal(a @ a, reduced)  # the global setting is back after the call
        with fp32_math():
            assert torch.equal(a @ a, exact)
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(got.valid, ref.valid)
    torch.testing.assert_close(got.xy, ref.xy, atol=0, rtol=0)

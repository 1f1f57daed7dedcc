"""siftguide.relevance.graph: the detector recorded as a CUDA graph (or compiled) equals the eager one."""
import pytest
import torch

from siftguide.relevance import detect_keypoints
from siftguide.relevance.cache import pack_keypoints


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["graph", "compile"])
def test_captured_detector_equals_eager_on_cuda(backend):
    from siftguide.relevance.graph import Captured
    from tests.oracle import photo_batch

    x = (photo_batch(64, crops_per_photo=1)[:16].float() / 255).cuda()
    fn = Captured(lambda t: pack_keypoints(detect_keypoints(t, max_keypoints=64), torch.float32), backend)
    ref = pack_keypoints(detect_keypoints(x, max_keypoints=64), torch.float32)
    for _ in range(3):  # eager, recorded, replayed
        got = fn(x)
        torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=0)
        assert torch.equal(got[1], ref[1])
    torch.set_float32_matmul_precision("high")  # TF32 allowed globally: the recorded detector stays fp32
    try:
        y = x.flip(-1)
        torch.testing.assert_close(fn(y)[0], pack_keypoints(detect_keypoints(y, max_keypoints=64), torch.float32)[0],
                                   atol=1e-4, rtol=0)
    finally:
        torch.set_float32_matmul_precision("highest")

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_recording_while_a_pinned_memory_loader_runs():
    # training records the detector mid-epoch, while the DataLoader's pin-memory thread allocates pinned host memory:
    # a capture in the global error mode would fail on that thread's CUDA calls
    from siftguide.relevance.graph import Captured

    data = torch.utils.data.TensorDataset(torch.rand(64, 1, 64, 64))
    loader = torch.utils.data.DataLoader(data, batch_size=8, num_workers=2, pin_memory=True)
    fn = Captured(lambda t: pack_keypoints(detect_keypoints(t, max_keypoints=32), torch.float32), "graph")
    outs = [fn(x.cuda(non_blocking=True))[1] for (x,) in loader]  # the second call records, the rest replay
    assert len(fn._graphs) == 1 and len(outs) == 8
    torch.testing.assert_close(outs[-1], pack_keypoints(detect_keypoints(data.tensors[0][-8:].cuda(),
                                                                         max_keypoints=32), torch.float32)[1])

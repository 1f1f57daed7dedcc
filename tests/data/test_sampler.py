"""siftguide.data.sampler: the resumable sampler continues mid-epoch and draws no global random numbers."""
import pytest
import torch

from siftguide.data.sampler import ResumableSampler


def test_sampler_resumes_mid_epoch_and_draws_no_global_random_numbers():
    data = list(range(50))
    pos = {"b": 0}
    s = ResumableSampler(data, batch_size=8, seed=3, position=lambda: pos["b"])
    assert s.batches_per_epoch == 6
    state = torch.get_rng_state()
    e0, e1 = s.permutation(0), s.permutation(1)
    assert sorted(e0) == data and e0 != e1 and e0 != data
    assert list(iter(s)) == e0
    pos["b"] = 6 + 2  # two batches into epoch 1
    assert list(iter(s)) == e1[16:] and s.epoch == 1
    assert torch.equal(torch.get_rng_state(), state)
    assert ResumableSampler(data, 8, seed=4).permutation(0) != e0  # the run's seed changes the order
    ranks = [ResumableSampler(data, 4, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    assert sorted(ranks[0].permutation(0) + ranks[1].permutation(0)) == data  # 25 each, disjoint, complete
    with pytest.raises(ValueError, match="fewer than one batch"):
        ResumableSampler(data[:3], batch_size=8)

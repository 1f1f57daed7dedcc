"""siftguide.guidance.base: the relevance of the visible tokens."""
import pytest
import torch

from siftguide.guidance import visible_relevance


def test_visible_relevance_restricts_and_renormalises():
    rel = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    v = visible_relevance(rel, torch.tensor([[1, 3]]))
    torch.testing.assert_close(v, torch.tensor([[1 / 3, 2 / 3]]))
    z = visible_relevance(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0, 1]]))
    torch.testing.assert_close(z, torch.tensor([[0.5, 0.5]]))
    assert float(v.sum()) == pytest.approx(1.0)

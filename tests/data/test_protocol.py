"""siftguide.data.protocol: take(), one way to read images outside the loaders."""
import torch


def test_take_reads_protocol_datasets_in_memory_and_by_item(tmp_path):
    """siftguide.data.protocol.take: one way to read images outside the loaders (kNN bank, monitor, analysis)."""
    from siftguide.data.protocol import take

    class InMemory:
        images = torch.arange(5 * 4).view(5, 1, 2, 2).to(torch.uint8)
        labels = torch.tensor([0, 1, 2, 3, 4])

        def __getitem__(self, i):  # never called: in-memory datasets are sliced
            raise AssertionError("item access on an in-memory dataset")

    x, y, kept = take(InMemory(), [4, 1])
    assert torch.equal(x, InMemory.images[[4, 1]]) and y.tolist() == [4, 1] and kept == [4, 1]

    class Files:  # items as image folders give them; item 1 an unreadable file
        def __getitem__(self, i):
            return {"image": torch.full((1, 2, 2), i, dtype=torch.uint8), "label": torch.tensor(i % 2), "index": i,
                    "valid": i != 1}

    x, y, kept = take(Files(), range(3))
    assert kept == [0, 2] and x[:, 0, 0, 0].tolist() == [0, 2] and y.tolist() == [0, 0] and y.dtype == torch.long
    assert take(Files(), [1])[2] == []  # nothing readable: empty, the caller says what to do

"""siftguide.callbacks.progress: the step progress bar, and no third-party warnings in a run's output."""
import warnings

from siftguide.train import train


def test_step_progress_bar_and_no_third_party_warnings(tiny_cfg, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", append=True)  # whatever train.py does not filter is recorded
        train(tiny_cfg(["trainer.enable_progress_bar=true", "callbacks.knn=null", "trainer.log_every_n_steps=50"],
                       name="bar"))
    out = capsys.readouterr().out
    assert "Steps" in out and "4/4" in out and "Epoch" not in out
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "exists and is not empty" in m or "LeafSpec" in m], messages
    assert any("smaller than the logging interval" in m for m in messages)  # the user's own setting: kept

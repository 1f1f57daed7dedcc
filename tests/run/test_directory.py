"""A run directory holds one run: a training into a directory that holds a run stops before any work and leaves every
file as it was; overwrite=true moves the old files aside; a resume that would swap the guidance modes is refused; a
checkpoint that cannot be written names the file and the last good checkpoint's step."""
import hashlib
from pathlib import Path

import pytest

from siftguide.run.changes import ResumeRefused
from siftguide.run.directory import RunDirectoryHoldsARun, describe
from siftguide.train import train

CHEAP = ["callbacks.knn=null", "callbacks.attention_divergence.batches=0", "trainer.max_steps=2",
         "trainer.val_check_interval=2"]


def checksums(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def test_a_finished_run_is_never_replaced_silently(tiny_cfg):
    cfg = tiny_cfg(CHEAP, name="done")
    run = Path(cfg.paths.output_dir)
    train(cfg)
    before = checksums(run)
    assert describe(run) == "a finished run (step 2)"
    with pytest.raises(RunDirectoryHoldsARun, match=r"already holds a finished run \(step 2\).*ckpt_path=last.*"
                                                    r"hydra.run.dir=\.\.\..*overwrite=true"):
        train(tiny_cfg(CHEAP, name="done"))
    assert checksums(run) == before  # nothing written: not config.yaml, not metrics.csv, not a checkpoint
    train(tiny_cfg([*CHEAP, "overwrite=true"], name="done"))
    (aside,) = run.glob("replaced-*")
    assert checksums(aside) == {k: v for k, v in before.items() if k != "run.lock"}  # every old file, byte for byte
    assert describe(run) == "a finished run (step 2)"  # the new run


@pytest.mark.parametrize("swap", ["guidance=prior", "guidance=none", "guidance=[prior,token_drop]"])
def test_a_resume_that_swaps_the_guidance_modes_is_refused(tiny_cfg, tiny_run, tmp_path, swap):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run(CHEAP).dir, run)  # guidance=attention, 2 steps
    before = checksums(run)
    cfg = tiny_cfg([*CHEAP, "trainer.max_steps=4", "ckpt_path=last", swap, f"hydra.run.dir={run}"], name="copy")
    with pytest.raises(ResumeRefused, match=r"guidance modes: \['attention'\] -> \["):
        train(cfg)
    assert checksums(run) == before


def test_a_failed_checkpoint_write_names_the_file_and_the_last_good_step(tiny_cfg, monkeypatch):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from siftguide.run.resume import CheckpointWriteError

    real, calls = TorchCheckpointIO.save_checkpoint, []

    def full_disk(self, checkpoint, path, storage_options=None):
        calls.append(path)
        if len(calls) > 1:  # the first checkpoint (step 2) is written, the next one (step 4) fails
            raise OSError(27, "File too large")
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full_disk)
    cfg = tiny_cfg([*CHEAP, "trainer.max_steps=4"], name="full")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointWriteError, match=rf"could not write the checkpoint {last} at step 4 "
                                                   rf"\(OSError: \[Errno 27\] File too large\); the last good "
                                                   rf"checkpoint, {last} \(step 2\), is intact"):
        train(cfg)

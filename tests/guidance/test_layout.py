"""siftguide.guidance keeps file = config name for every mode; the former module names stay importable."""
from siftguide.guidance import KeypointReconWeight, SiftGuidance, keypoint_weights
from siftguide.objectives import MAEObjective


def test_mode_files_are_named_as_their_configs_and_old_paths_still_work():
    """file = config name for every mode; siftguide.guidance.alignment / .recon (the former files) stay importable."""
    import importlib

    import yaml

    from siftguide import SiftGuidance as top
    from siftguide.guidance.alignment import SiftGuidance as old_attention, divergence as old_divergence
    from siftguide.guidance.recon import KeypointReconWeight as old_recon, keypoint_weights as old_weights
    from siftguide.objectives import MAEObjective as mae, encode  # noqa: F401 - the stable public API
    from tests.conftest import ROOT

    assert old_attention is top is SiftGuidance and old_recon is KeypointReconWeight
    assert old_divergence is importlib.import_module("siftguide.guidance.attention").divergence
    assert old_weights is keypoint_weights and mae is MAEObjective
    for cfg in sorted((ROOT / "configs" / "guidance").glob("*.yaml")):
        node = {k: v for k, v in yaml.safe_load(cfg.read_text()).items() if isinstance(v, dict)}
        for name, mode in node.items():  # every mode node: guidance.<name> -> siftguide/guidance/<name>.py
            cls = getattr(importlib.import_module("siftguide.guidance"), mode["_target_"].rsplit(".", 1)[1])
            assert cls.__module__ == f"siftguide.guidance.{name}" and cls.name == name, (cfg.name, cls)

"""siftguide.guidance keeps file = class = config name for every mode."""
import importlib

import yaml

from tests.conftest import ROOT


def test_mode_files_are_named_as_their_configs():
    """Every mode node guidance.<name> of configs/guidance/*.yaml targets a class defined in
    siftguide/guidance/<name>.py whose ``name`` is <name>."""
    seen = set()
    for cfg in sorted((ROOT / "configs" / "guidance").glob("*.yaml")):
        node = {k: v for k, v in yaml.safe_load(cfg.read_text()).items() if isinstance(v, dict)}
        for name, mode in node.items():
            cls = getattr(importlib.import_module("siftguide.guidance"), mode["_target_"].rsplit(".", 1)[1])
            assert cls.__module__ == f"siftguide.guidance.{name}" and cls.name == name, (cfg.name, cls)
            assert cfg.stem == name, cfg.name
            seen.add(name)
    assert {"attention", "prior", "token_drop", "masking", "recon_weight"} <= seen

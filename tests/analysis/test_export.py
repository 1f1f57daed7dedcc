"""Export to timm: the shared tiny run of each objective, exported, loads in timm strictly and computes what the net
did."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from safetensors.torch import load_file

from siftguide.analysis.export import ExportError, export_checkpoint, main
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def runs(supervised_run, mae_run):
    """One tiny trained run per objective, the session's shared ones (read only): ``{objective: (cfg, ckpt)}``."""
    return {"supervised": (supervised_run.cfg, supervised_run.ckpt), "mae": (mae_run.cfg, mae_run.ckpt)}


def trained_net(cfg, ckpt: Path) -> torch.nn.Module:
    """The run's ViT rebuilt from its own config node and the checkpoint's ``net.*`` entries."""
    net = instantiate(cfg.model)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")}, strict=True)
    return net.eval()


def images(cfg, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, generator=g)


def load_timm(out: Path, how: str, caplog) -> torch.nn.Module:
    """Load an export the two documented ways; fail on any missing/unexpected key timm reports."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="timm"):
        if how == "local-dir":
            model = timm.create_model(f"local-dir:{out}", pretrained=True)
        else:
            cfg = json.loads((out / "config.json").read_text())
            overlay = dict(cfg["pretrained_cfg"], file=str(out / "model.safetensors"))
            model = timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                                      **cfg["model_args"])
    assert not [r.getMessage() for r in caplog.records if "keys" in r.getMessage().lower()]
    assert any("Loading pretrained weights" in r.getMessage() for r in caplog.records)  # really loaded
    # timm loads strictly unless the head size differs: check the file against the model ourselves too
    res = model.load_state_dict(load_file(out / "model.safetensors"), strict=False)
    assert res.missing_keys == [] and res.unexpected_keys == []
    return model.eval()


@pytest.mark.parametrize("how", ["local-dir", "overlay"])
def test_supervised_export_keeps_the_trained_head(runs, tmp_path, caplog, how):
    cfg, ckpt = runs["supervised"]
    res = export_checkpoint(ckpt, tmp_path / "out")
    assert res["head"] == "kept" and res["model_args"]["num_classes"] == cfg.num_classes
    model = load_timm(tmp_path / "out", how, caplog)
    x = images(cfg)
    with torch.no_grad():
        assert torch.allclose(model(x), trained_net(cfg, ckpt)(x), atol=1e-6)
    pc = model.pretrained_cfg
    assert tuple(pc["input_size"]) == (cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    assert list(pc["mean"]) == list(cfg.transform.mean) and list(pc["std"]) == list(cfg.transform.std)
    assert pc["num_classes"] == cfg.num_classes and pc["interpolation"] == "bilinear" and pc["crop_pct"] == 1.0


@pytest.mark.parametrize("how", ["local-dir", "overlay"])
def test_mae_export_drops_the_untrained_head_and_the_decoder(runs, tmp_path, caplog, how):
    cfg, ckpt = runs["mae"]
    res = export_checkpoint(ckpt, tmp_path / "out")
    assert res["head"] == "dropped" and res["model_args"]["num_classes"] == 0
    keys = set(load_file(tmp_path / "out" / "model.safetensors"))
    assert not any(k.startswith(("head.", "objective.", "net.", "decoder", "mask_token", "probe")) for k in keys)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["siftguide"]["head"] == "dropped" and config["num_classes"] == 0
    model = load_timm(tmp_path / "out", how, caplog)
    net, x = trained_net(cfg, ckpt), images(cfg)
    with torch.no_grad():
        ref = net.forward_head(net.forward_features(x), pre_logits=True)
        assert torch.allclose(model(x), ref, atol=1e-6)


def test_mae_probe_becomes_the_timm_head(runs, tmp_path, caplog):
    cfg, ckpt = runs["mae"]
    assert export_checkpoint(ckpt, tmp_path / "out", head="probe")["head"] == "probe"
    model = load_timm(tmp_path / "out", "local-dir", caplog)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    net, x = trained_net(cfg, ckpt), images(cfg)
    with torch.no_grad():
        # the objective's probe reads the class token of the final (normed) tokens
        ref = F.linear(net.forward_features(x)[:, 0], state["objective.probe.weight"], state["objective.probe.bias"])
        assert torch.allclose(model(x), ref, atol=1e-6)


def test_timm_save_for_hf_writes_the_weights_and_our_pretrained_cfg(runs, tmp_path):
    # the files come from timm.models.save_for_hf: the weights are the checkpoint's net.* entries, and the
    # pretrained_cfg describes them only (the registry's tag, license, hub id of other weights are not carried over)
    cfg, ckpt = runs["supervised"]
    res = export_checkpoint(ckpt, tmp_path / "out")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert set(saved) == {k[4:] for k in state if k.startswith("net.")}
    assert all(torch.equal(saved[k], state["net." + k]) for k in saved)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["pretrained_cfg"] == json.loads(json.dumps(res["pretrained_cfg"]))
    assert not {"tag", "license", "hf_hub_id", "url"} & set(config["pretrained_cfg"])
    assert config["architecture"] == res["architecture"] and config["num_classes"] == cfg.num_classes
    assert config["siftguide"]["head"] == "kept" and config["siftguide"]["config"]["model"]["depth"] == 2


def test_keep_and_drop_override_the_default(runs, tmp_path):
    res = export_checkpoint(runs["mae"][1], tmp_path / "mae_keep", head="keep")
    assert res["head"] == "kept" and "UNTRAINED" in res["head_note"]
    res = export_checkpoint(runs["supervised"][1], tmp_path / "sup_drop", head="drop")
    assert res["head"] == "dropped" and "head.weight" not in load_file(tmp_path / "sup_drop" / "model.safetensors")


@pytest.mark.e2e
def test_command_line_on_a_run_directory(runs, tmp_path):
    run_dir = runs["mae"][1].parents[1]
    proc = subprocess.run([sys.executable, "-m", "siftguide.analysis.export", str(run_dir), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "head: dropped" in proc.stdout and "timm.create_model(\"local-dir:" in proc.stdout
    assert (tmp_path / "o" / "model.safetensors").is_file() and (tmp_path / "o" / "config.json").is_file()


def test_clear_errors(runs, tmp_path, capsys):
    ckpt = runs["supervised"][1]
    # missing file: message on stderr, exit status 1
    assert main([str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    # not a checkpoint at all
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(ExportError, match="not a PyTorch checkpoint"):
        export_checkpoint(tmp_path / "text.ckpt", tmp_path / "o")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    # a checkpoint of some other model (no net.* keys)
    torch.save({"state_dict": {"model.weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ExportError, match="not a siftguide checkpoint"):
        export_checkpoint(tmp_path / "other.ckpt", tmp_path / "o")
    # no config in the checkpoint and none beside it
    torch.save({"state_dict": state["state_dict"]}, tmp_path / "noconf.ckpt")
    with pytest.raises(ExportError, match="no run config"):
        export_checkpoint(tmp_path / "noconf.ckpt", tmp_path / "o")
    # unknown timm architecture
    state["hyper_parameters"]["config"]["model"]["model_name"] = "vit_does_not_exist"
    torch.save(state, tmp_path / "unknown.ckpt")
    with pytest.raises(ExportError, match="unknown timm model 'vit_does_not_exist'"):
        export_checkpoint(tmp_path / "unknown.ckpt", tmp_path / "o")
    # objects the safe loader refuses: an error naming the opt-in, which then works
    state["hyper_parameters"]["config"]["model"]["model_name"] = cfg_name = "vit_tiny_patch16_224"
    torch.save({**state, "extra": argparse.Namespace(a=1)}, tmp_path / "pickled.ckpt")
    with pytest.raises(ExportError, match="--trust-checkpoint"):
        export_checkpoint(tmp_path / "pickled.ckpt", tmp_path / "o")
    res = export_checkpoint(tmp_path / "pickled.ckpt", tmp_path / "trusted", trust_checkpoint=True)
    assert res["architecture"] == cfg_name
    # a probe head where there is no probe
    with pytest.raises(ExportError, match="no online linear probe"):
        export_checkpoint(ckpt, tmp_path / "o", head="probe")
    assert not (tmp_path / "o").exists()  # nothing written by any failed export


def test_config_read_from_the_run_directory(runs, tmp_path):
    """A checkpoint saved without hyper-parameters still exports when its run directory has config.yaml."""
    ckpt = runs["supervised"][1]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt.parents[1] / "config.yaml", tmp_path / "run" / "config.yaml")
    torch.save({"state_dict": state["state_dict"]}, tmp_path / "run" / "checkpoints" / "last.ckpt")
    res = export_checkpoint(tmp_path / "run", tmp_path / "out")
    assert res["head"] == "kept" and res["pretrained_cfg"]["input_size"][0] == 1

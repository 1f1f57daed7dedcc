"""Export a siftguide checkpoint's encoder as timm weights: ``python -m siftguide.analysis.export CKPT --out DIR``.

``CKPT`` is a Lightning checkpoint written by ``train.py`` (``checkpoints/last.ckpt``) or the run directory that
holds it. Its ``state_dict`` keys ``net.*`` are the timm ViT; every other key belongs to the objective (the MAE
decoder, the online probe) and is left out. The resolved run config stored in the checkpoint
(``hyper_parameters["config"]``, else the run directory's ``config.yaml``) gives the ``timm.create_model``
kwargs (``model``) and the input normalisation (``transform.mean`` / ``transform.std``).

``DIR`` gets the Hugging Face Hub layout that timm reads, written by timm's own ``save_for_hf``:

* ``model.safetensors``: the ViT's state dict, ``net.`` prefix removed;
* ``config.json``: ``architecture``, ``model_args`` (the create_model kwargs, ``num_classes`` as exported; timm
  >= 1.0.2x records them itself: ``img_size`` as ``[H, W]`` and the model's ``global_pool`` added),
  ``pretrained_cfg`` (``input_size``, ``mean``, ``std``, ``num_classes``, ``interpolation``, ``crop_pct``, ...;
  only fields that describe these weights, none of the registry's tag, license or hub id) and a ``siftguide``
  entry (source checkpoint, objective, head policy, resolved run config).

Load it with timm (>= 1.0.16 for ``local-dir:``)::

    model = timm.create_model("local-dir:DIR", pretrained=True)

or with any timm >= 1.0.9 from the two files::

    cfg = json.loads(Path("DIR/config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                              pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file="DIR/model.safetensors"))

``pretrained_cfg_overlay=dict(file=...)`` alone is not enough: the registry's default pretrained config of the
architecture would then say 1000 classes (timm drops a head of another size, logging the missing keys at INFO
level only), 3 input channels and, for the ViT ``augreg`` tags in timm 1.0.9 and 1.0.16, ``custom_load=True``
(the file would be read as a JAX ``.npz``). The overlay form gives identical outputs with timm 1.0.9, 1.0.16 and
1.0.31, the ``local-dir:`` form with 1.0.16 and 1.0.31 (checked on a 1-channel model: timm 1.0.9 and 1.0.16
adapt the stem as if the weights had 3 channels, which is exact for 1 and 3 input channels only).

Classifier head (``--head``):

* ``keep``: the net's own head, as trained by ``objective=supervised``;
* ``drop``: ``num_classes=0``, the model returns pooled pre-logit features. ``auto`` (default) picks ``drop`` for
  objectives that do not train the head (MAE: its head is the random init) and ``keep`` otherwise;
* ``probe``: MAE only, the online linear probe becomes the timm head (exact when the probe read the class token,
  ``objective.pool=cls``, and the ViT pools the class token, ``global_pool="token"``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .loading import NET_PREFIX, CheckpointError, encoder_state_dict, load_run_checkpoint

# a checkpoint that cannot be read or exported (not a siftguide checkpoint, unknown model, bad ``--head``)
ExportError = CheckpointError

__all__ = ["ExportError", "load_run_checkpoint", "encoder_state_dict", "export_checkpoint", "load_snippet", "main"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
HEADS = ("auto", "keep", "drop", "probe")
# pretrained_cfg fields describing the exported weights (the rest of the registry's cfg names its own weights)
_CFG_FIELDS = ("input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
               "num_classes", "pool_size", "first_conv", "classifier")


def _model_node(config: dict) -> dict:
    node = config.get("model")
    if not isinstance(node, dict):  # a renamed group: the node that builds a timm model
        node = next((v for v in config.values() if isinstance(v, dict) and v.get("_target_") == "timm.create_model"),
                    None)
    if not isinstance(node, dict):
        raise ExportError("the run config has no 'model' node (the timm.create_model kwargs)")
    target = node.get("_target_", "timm.create_model")
    if target not in ("timm.create_model", "timm.models.create_model", "timm.models._factory.create_model"):
        raise ExportError(f"model._target_ is {target!r}: only nets built by timm.create_model can be exported")
    if "model_name" not in node:
        raise ExportError("the run config's model node has no 'model_name'")
    return node


def _normalisation(config: dict) -> tuple[list[float], list[float]]:
    node = config.get("transform")
    if not (isinstance(node, dict) and "mean" in node and "std" in node):
        node = next((v for v in config.values() if isinstance(v, dict) and "mean" in v and "std" in v), None)
    if node is None:
        raise ExportError("the run config has no transform.mean / transform.std (input normalisation)")
    return [float(m) for m in node["mean"]], [float(s) for s in node["std"]]


def _objective_trains_head(config: dict) -> tuple[bool, str]:
    """Whether the objective trains the net's classifier (``needs_labels`` of its class: supervised)."""
    target = str((config.get("objective") or {}).get("_target_", ""))
    if not target:
        return True, "unknown"
    try:
        from hydra.utils import get_class

        return bool(getattr(get_class(target), "needs_labels", False)), target
    except Exception:  # noqa: BLE001  (a class renamed since the run): decide by name
        return "supervised" in target.lower(), target


# ---------------------------------------------------------------------------------------------------- export
def _probe_head(state_dict: dict[str, Tensor], config: dict, model: torch.nn.Module) -> tuple[Tensor, Tensor]:
    keys = [k for k in state_dict if not k.startswith(NET_PREFIX) and k.endswith("probe.weight")]
    if not keys:
        raise ExportError("--head probe: the checkpoint has no online linear probe (objective=mae with "
                          "objective.num_classes > 0)")
    w, b = state_dict[keys[0]], state_dict[keys[0][: -len("weight")] + "bias"]
    pool = (config.get("objective") or {}).get("pool", "cls")
    if pool != "cls" or getattr(model, "global_pool", None) != "token" or getattr(model, "cls_token", None) is None:
        raise ExportError(f"--head probe needs a probe on the class token (objective.pool=cls, got {pool!r}) and a "
                          f"ViT pooling the class token (global_pool='token', got "
                          f"{getattr(model, 'global_pool', None)!r}): timm's head would see other features")
    if not isinstance(getattr(model, "fc_norm", torch.nn.Identity()), torch.nn.Identity):
        raise ExportError("--head probe: this ViT normalises pooled features (fc_norm), the probe did not")
    return w, b


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, head: str = "auto",
                      trust_checkpoint: bool = False) -> dict[str, Any]:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` for a siftguide checkpoint.

    The weights are checked before writing: ``timm.create_model(architecture, **model_args)`` must load them
    strictly (no missing or unexpected keys).

    Args:
        ckpt_path: ``.ckpt`` file, or a run directory holding ``checkpoints/last.ckpt``.
        out_dir: created if needed; existing ``model.safetensors`` / ``config.json`` are replaced.
        head: ``auto`` | ``keep`` | ``drop`` | ``probe`` (see the module docstring).
        trust_checkpoint: read it with ``torch.load(weights_only=False)`` (checkpoints whose callbacks pickled
            custom objects; this runs the file's pickled code). Checkpoints of ``train.py`` load without it.

    Returns:
        dict with ``out_dir``, ``weights``, ``config`` (paths), ``architecture``, ``model_args``,
        ``pretrained_cfg``, ``head`` (what was done: ``kept`` | ``dropped`` | ``probe``), ``head_note``,
        ``num_params`` and ``snippet`` (Python that loads the export).
    """
    import timm
    from timm.models import save_for_hf

    if head not in HEADS:
        raise ExportError(f"head must be one of {HEADS}, got {head!r}")
    state, config, meta = load_run_checkpoint(ckpt_path, trust=trust_checkpoint)
    node = _model_node(config)
    architecture = str(node["model_name"])
    if not timm.is_model(architecture):
        raise ExportError(f"unknown timm model {architecture!r} (model.model_name of the run config; "
                          f"timm {timm.__version__} does not register it)")
    model_args = {k: v for k, v in node.items() if not k.startswith("_") and k not in ("model_name", "pretrained")}
    mean, std = _normalisation(config)
    weights = encoder_state_dict(state)

    trains_head, objective = _objective_trains_head(config)
    probe = None
    if head == "auto":
        head = "keep" if trains_head else "drop"
    if head == "keep":
        action = "kept"
        note = ("the classifier trained by the objective" if trains_head else
                f"UNTRAINED: {objective} does not train the net's head; these are its random initial weights")
    elif head == "drop":
        action = "dropped"
        note = "num_classes=0: the model returns pooled pre-logit features"
        model_args["num_classes"] = 0
    else:
        action = "probe"
        tmp = timm.create_model(architecture, pretrained=False, **{**model_args, "num_classes": 0})
        probe = _probe_head(state, config, tmp)
        model_args["num_classes"] = int(probe[0].shape[0])
        note = "the objective's online linear probe (on stop-gradient class-token features) as the classifier"
    if action in ("dropped", "probe"):
        classifier = ("head", "head_dist")
        weights = {k: v for k, v in weights.items() if k.split(".")[0] not in classifier}
    if probe is not None:
        weights["head.weight"], weights["head.bias"] = probe

    model = timm.create_model(architecture, pretrained=False, **model_args)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ExportError(f"the checkpoint's net.* weights do not fit timm.create_model({architecture!r}, "
                          f"**{model_args}): {e}") from e
    in_chans = int(model_args.get("in_chans", 3))
    if len(mean) != in_chans or len(std) != in_chans:
        raise ExportError(f"transform mean/std have {len(mean)}/{len(std)} values for in_chans={in_chans}")
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or model_args.get("img_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)

    pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k in _CFG_FIELDS}
    pretrained_cfg.update(
        input_size=[in_chans, int(size[0]), int(size[1])],
        fixed_input_size=not bool(model_args.get("dynamic_img_size", False)),
        # siftguide evaluates whole images resized (bilinear) to img_size: no crop
        interpolation="bilinear", crop_pct=1.0, crop_mode="center",
        mean=mean, std=std, num_classes=int(model.num_classes), custom_load=False,
    )
    out = Path(out_dir)
    siftguide_entry = {"checkpoint": meta["path"], "global_step": meta["global_step"], "objective": objective,
                       "head": action, "head_note": note, "config": config}
    # timm writes the hub layout: model.safetensors (the model's state_dict, i.e. the weights checked above) and
    # config.json (architecture, num_classes, num_features, global_pool, model_args, pretrained_cfg, + our entry).
    # The model's pretrained_cfg becomes ours first: the registry's names other weights (tag, license, hub id)
    model.pretrained_cfg = {**pretrained_cfg, "architecture": architecture}
    save_for_hf(model, str(out), model_args=model_args, safe_serialization=True,
                model_config={"pretrained_cfg": pretrained_cfg,
                              "siftguide": json.loads(json.dumps(siftguide_entry, default=str))})
    tensors = model.state_dict()
    return {
        "out_dir": str(out), "weights": str(out / WEIGHTS_NAME), "config": str(out / CONFIG_NAME),
        "architecture": architecture, "model_args": model_args, "pretrained_cfg": pretrained_cfg,
        "head": action, "head_note": note, "num_params": sum(t.numel() for t in tensors.values()),
        "snippet": load_snippet(out),
    }


def load_snippet(out_dir: str | Path) -> str:
    """Python that loads an export with timm (the ``local-dir:`` form and the two-file form)."""
    d = Path(out_dir).resolve()
    return (
        "import json, timm\n"
        f'model = timm.create_model("local-dir:{d}", pretrained=True)  # timm >= 1.0.16\n'
        "# or, with any timm >= 1.0.9:\n"
        f'cfg = json.load(open("{d / CONFIG_NAME}"))\n'
        'model = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],\n'
        f'                          pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file="{d / WEIGHTS_NAME}"))\n'
        "data_cfg = timm.data.resolve_data_config(model=model)  # input size, mean/std, bilinear resize, no crop\n"
        "transform = timm.data.create_transform(**data_cfg)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m siftguide.analysis.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a siftguide .ckpt, or a run directory holding checkpoints/last.ckpt")
    ap.add_argument("--out", required=True, help="output folder (model.safetensors + config.json)")
    ap.add_argument("--head", choices=HEADS, default="auto",
                    help="classifier: keep the net's head, drop it (num_classes=0, features), or the MAE online "
                         "probe; auto: keep for supervised, drop for objectives that leave the head untrained")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="torch.load(weights_only=False): only for checkpoints you trust (runs pickled code)")
    args = ap.parse_args(argv)
    try:
        res = export_checkpoint(args.checkpoint, args.out, head=args.head, trust_checkpoint=args.trust_checkpoint)
    except (ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    pc = res["pretrained_cfg"]
    print(f"exported {res['architecture']} ({res['num_params']:,} parameters) to {res['out_dir']}")
    print(f"  input {tuple(pc['input_size'])}, mean {pc['mean']}, std {pc['std']}, num_classes {pc['num_classes']}")
    print(f"  head: {res['head']}: {res['head_note']}")
    print(f"  wrote {res['weights']}, {res['config']}")
    print("load it with timm:\n")
    print(res["snippet"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Config checks before anything is built: ``validate_config(cfg)`` (called first in ``train.build``).

Cheap and config-level only (no model, no data read): values that would otherwise fail late with a cryptic
message, or worse train silently on something else than asked (a patch size that does not divide the image
size trains on a floored grid; ``trainer.max_steps=0`` saves an untrained checkpoint; ``num_classes=0`` builds no
classifier head and "trains" on the features). Every problem found is listed in one ``ValueError``, each naming
the key, the value and what to do; a value of the wrong type (``trainer.max_steps=abc``) is named first, alone
(the other checks need numbers). Guidance layers and heads out of range are reported by the modes themselves when
the module is built (still before training); more class folders than ``num_classes`` when the data is set up.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import UserError

# keys read as numbers: (key, integer?); null is left to the code that reads the key
_NUMBERS = (
    ("seed", True), ("num_classes", True), ("trainer.max_steps", True), ("trainer.max_epochs", True),
    ("trainer.log_every_n_steps", True), ("trainer.val_check_interval", False), ("trainer.gradient_clip_val", False),
    ("trainer.devices", True), ("trainer.num_nodes", True), ("data.batch_size", True), ("data.num_workers", True),
    ("data.val_size", True), ("data.train_subset", True), ("data.val_subset", True), ("data.img_size", True),
    ("data.max_skip_fraction", False), ("optimizer.lr", False), ("optimizer.weight_decay", False),
    ("module.warmup_steps", True), ("module.min_lr_factor", False), ("guidance.weight", False),
    ("model.num_classes", True), ("model.in_chans", True), ("model.embed_dim", True), ("model.depth", True),
    ("model.num_heads", True), ("model.mlp_ratio", False), ("callbacks.knn.bank_size", True),
    ("callbacks.knn.query_size", True), ("callbacks.knn.k", True), ("callbacks.knn.batch_size", True),
    ("callbacks.attention_divergence.batches", True),
)

__all__ = ["validate_config", "ConfigError"]


class ConfigError(UserError, ValueError):
    """Values of a composed config that do not fit, listed with the key, the value and what to do."""


def _pair(v) -> tuple[int, int] | None:
    if v is None:
        return None
    return (int(v), int(v)) if isinstance(v, (int, float, str)) else tuple(int(x) for x in v)


def _model_problems(m: DictConfig) -> list[str]:
    out = []
    name = str(m.get("model_name", ""))
    # timm names carry the defaults: vit_small_patch16_224 -> patch 16, 224 px
    img = _pair(m.get("img_size")) or _pair((re.findall(r"_(\d+)(?:\.|$)", name) or [None])[0])
    patch = _pair(m.get("patch_size")) or _pair((re.findall(r"patch(\d+)", name) or [None])[0])
    if img and patch:
        if min(patch) < 1:
            out.append(f"model.patch_size={m.get('patch_size')} must be >= 1")
        elif img[0] % patch[0] or img[1] % patch[1]:
            grid = f"{img[0] // patch[0]}x{img[1] // patch[1]}"
            fits = sorted({p for p in range(2, min(img) + 1) if img[0] % p == 0 and img[1] % p == 0})
            out.append(f"model.patch_size={patch[0] if patch[0] == patch[1] else list(patch)} does not divide "
                       f"model.img_size={img[0] if img[0] == img[1] else list(img)}: the ViT would silently drop the "
                       f"border and train on a {grid} grid. Use a patch size dividing the image size "
                       f"({', '.join(map(str, fits[:8]))}{' ...' if len(fits) > 8 else ''}) or change model.img_size")
    dim, heads = m.get("embed_dim"), m.get("num_heads")
    if dim is not None and heads is not None and (int(heads) < 1 or int(dim) % int(heads)):
        out.append(f"model.embed_dim={dim} must be a multiple of model.num_heads={heads} (each head gets "
                   f"embed_dim / num_heads channels)")
    if m.get("depth") is not None and int(m.depth) < 1:
        out.append(f"model.depth={m.depth} must be >= 1")
    return out


def _trainer_problems(t: DictConfig) -> list[str]:
    steps, epochs = t.get("max_steps"), t.get("max_epochs")
    if steps is None:
        return []
    steps = int(steps)
    if steps == 0:
        return ["trainer.max_steps=0 trains nothing (and would save an untrained checkpoint): set the number of "
                "optimizer steps, or -1 with trainer.max_epochs=N to train N epochs"]
    if steps < -1:
        return [f"trainer.max_steps={steps} is not a step count: use a positive number, or -1 with "
                f"trainer.max_epochs=N"]
    if steps == -1 and (epochs is None or int(epochs) < 1) and not t.get("max_time"):
        return [f"trainer.max_steps=-1 with trainer.max_epochs={epochs} never ends (and the LR schedule has no "
                f"length): set trainer.max_epochs to a number of epochs >= 1, or trainer.max_steps"]
    return []


def _data_problems(cfg: DictConfig) -> list[str]:
    d, out = cfg.data, []
    if d.get("batch_size") is not None and int(d.batch_size) < 1:
        out.append(f"data.batch_size={d.batch_size} must be >= 1 (images per device and step)")
    knn = (cfg.get("callbacks") or {}).get("knn") or {}
    if int(knn.get("batch_size", 1)) < 1:
        out.append(f"callbacks.knn.batch_size={knn.batch_size} must be >= 1")
    if str(d.get("_target_", "")).endswith("ImageFolderDataModule"):
        if OmegaConf.is_missing(d, "root") or not d.get("root"):
            out.append("data=image_folder needs data.root=/path/to/images (a folder holding train/<class>/* and "
                       "val/<class>/*)")
        elif not Path(str(d.root)).is_dir():
            out.append(f"data.root={d.root} is not a folder (missing or a file): it should hold "
                       f"{d.get('train_dir', 'train')}/<class>/* and {d.get('val_dir', 'val')}/<class>/*")
        if d.get("val_root") and not Path(str(d.val_root)).is_dir():
            out.append(f"data.val_root={d.val_root} is not a folder: it should hold <class>/* evaluation images")
    return out


def _transform_problems(cfg: DictConfig) -> list[str]:
    t, chans = cfg.get("transform") or {}, cfg.model.get("in_chans")
    out = []
    for key in ("mean", "std"):
        v = t.get(key)
        if v is not None and chans is not None and len(v) not in (1, int(chans)):
            n = "1 value" if int(chans) == 1 else f"1 or {chans} values"
            out.append(f"transform.{key} has {len(v)} values for model.in_chans={chans}: give {n} (e.g. "
                       f"transform=grey for 1-channel images, transform=imagenet for RGB)")
    return out


def activation_bytes(cfg: DictConfig) -> int | None:
    """An estimate of the activation memory a training step keeps for backward, in bytes (fp32), for the student's
    views of a multi-crop run: per block and token ``(8 + 2 * mlp_ratio) * dim`` values (attention input and output,
    q/k/v, norms, residuals, the MLP's hidden layer before and after its activation) plus ``2 * heads * T`` attention
    probabilities, over ``depth`` blocks, every view of every image of the batch. None when the config has no
    multi-crop transform or lacks the numbers."""
    t, m = cfg.get("transform") or {}, cfg.get("model") or {}
    if "local_crops" not in t:
        return None
    try:
        patch = int(m.patch_size) if m.get("patch_size") else int(re.findall(r"patch(\d+)", str(m.model_name))[0])
        dim, heads, depth = int(m.embed_dim), int(m.num_heads), int(m.depth)
        ratio, size, batch = float(m.get("mlp_ratio", 4.0)), int(t.img_size), int(cfg.data.batch_size)
        views = [(size, int(t.get("global_crops", 2))), (int(t.local_size), int(t.local_crops))]
    except (TypeError, ValueError, IndexError, AttributeError):
        return None
    total = 0
    for side, n in views:
        tokens = (side // patch) ** 2 + 1
        total += n * depth * tokens * ((8 + 2 * ratio) * dim + 2 * heads * tokens)
    return int(4 * batch * total)


def _memory_available(cfg: DictConfig) -> tuple[int, str]:
    """Bytes the step may use, and where: the first GPU's total memory when training on CUDA, else the host's
    available memory (``MemAvailable``)."""
    import torch

    accel = str(cfg.trainer.get("accelerator", "auto"))
    if accel in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory), "GPU"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "host"
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "host"


def _multicrop_problems(cfg: DictConfig) -> list[str]:
    need = activation_bytes(cfg)
    if need is None:
        return []
    have, where = _memory_available(cfg)
    if need <= 0.8 * have:
        return []
    t = cfg.transform
    return [f"transform.local_crops={t.local_crops} (and {t.get('global_crops', 2)} global views) at "
            f"data.batch_size={cfg.data.batch_size} would keep about {need / 2**30:.1f} GiB of activations for one step, "
            f"more than 80 % of the {have / 2**30:.1f} GiB of {where} memory: lower transform.local_crops, "
            f"transform.local_size or data.batch_size"]


def _select(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except Exception:  # noqa: BLE001  (an interpolation that does not resolve: reported where it is used)
        return None


def _type_problems(cfg: DictConfig) -> list[str]:
    """Keys whose value is not a number (or not an integer where one is needed), e.g. ``trainer.max_steps=abc``."""
    out = []
    for key, integer in _NUMBERS:
        v = _select(cfg, key)
        if v is None:
            continue
        kind = "an integer" if integer else "a number"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and v != int(v)):
            out.append(f"{key}={v!r} is not {kind}" + (f" (a {type(v).__name__})" if not isinstance(v, str) else ""))
    return out


def _class_of(target: str):
    try:
        from hydra.utils import get_class

        return get_class(target)
    except Exception:  # noqa: BLE001  (not importable here)
        return None


def _class_problems(cfg: DictConfig) -> list[str]:
    """A supervised objective needs a classifier with at least one logit per class of the data (timm builds no
    head for ``num_classes=0``: the loss would be computed on the pooled features, and the run would "train")."""
    target = str((cfg.get("objective") or {}).get("_target_", ""))
    cls = _class_of(target)
    supervised = bool(getattr(cls, "needs_labels", False)) if cls is not None else "supervised" in target.lower()
    head = _select(cfg, "model.num_classes") if cfg.get("model") is not None else None
    if not supervised or head is None:
        return []
    data_target = str((cfg.get("data") or {}).get("_target_", ""))
    n = getattr(_class_of(data_target), "num_classes", None) if data_target else None  # fixed by the data set
    if isinstance(n, int):
        classes, where = n, f"{data_target.rsplit('.', 1)[-1]} has {n} classes"
    elif isinstance(_select(cfg, "data.num_classes"), int):  # image folders: the folders are counted at setup
        classes = int(cfg.data.num_classes)
        where = f"data.num_classes={classes}; the class folders are counted when the data is set up"
    else:
        classes, where = None, ""
    fix = f"set num_classes={classes}" if classes else "set num_classes to the number of classes"
    if int(head) < 1:
        return [f"model.num_classes={head}: objective=supervised needs a classifier head, and timm builds none for "
                f"{head} classes (the loss would be computed on the features){' (' + where + ')' if where else ''}: "
                f"{fix}, or pre-train without labels with objective=mae"]
    if classes is not None and int(head) < classes:
        return [f"model.num_classes={head} is less than the classes of the data ({where}): {fix}"]
    return []


def validate_config(cfg: DictConfig) -> None:
    """Raise one ``ValueError`` listing every problem of a composed run config (none: returns ``None``)."""
    problems = _type_problems(cfg)
    if problems:  # the checks below read these keys as numbers
        raise ConfigError("config problems found before training:\n  - " + "\n  - ".join(problems))
    problems = _class_problems(cfg)
    if cfg.get("model") is not None:
        problems += _model_problems(cfg.model) + _transform_problems(cfg)
    if cfg.get("trainer") is not None:
        problems += _trainer_problems(cfg.trainer)
    if cfg.get("data") is not None:
        problems += _data_problems(cfg)
    if cfg.get("trainer") is not None and cfg.get("data") is not None:
        problems += _multicrop_problems(cfg)
    if (cfg.get("module") or {}).get("warmup_steps", 0) < 0:
        problems.append(f"module.warmup_steps={cfg.module.warmup_steps} must be >= 0")
    if problems:
        raise ConfigError("config problems found before training:\n  - " + "\n  - ".join(problems))

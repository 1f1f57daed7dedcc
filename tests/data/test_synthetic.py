"""Generated Fashion-MNIST variants: the pure functions on a handful of images, the DataModules on small splits."""
from functools import lru_cache

import pytest
import torch
from hydra.utils import instantiate

import siftguide.data.synthetic as syn
from siftguide import detect_keypoints
from siftguide.data import DeviceTransform, FashionMNISTDataModule, find_fashion_mnist, load_fashion_mnist
from tests.conftest import compose_cfg
from tests.helpers import write_idx

VARIANTS = {
    "fashion_mnist_translated": syn.TranslatedFashionMNISTDataModule,
    "fashion_mnist_cluttered": syn.ClutteredFashionMNISTDataModule,
    "fashion_mnist_tint": syn.TintedFashionMNISTDataModule,
    "fashion_mnist_decoy": syn.DecoyFashionMNISTDataModule,
}


def _have_fashion_mnist() -> bool:
    try:
        find_fashion_mnist(None, "data", download=False)
        return True
    except RuntimeError:
        return False


real_data = pytest.mark.skipif(not _have_fashion_mnist(), reason="Fashion-MNIST not installed (dataset-fashion-mnist)")


@lru_cache(maxsize=None)
def _load(split: str):
    """The real split, decoded once; the test split cut to its first 2000 images to keep the tests fast."""
    x, y = load_fashion_mnist(None, "data", split, download=False)
    return (x, y) if split == "train" else (x[:2000], y[:2000])


@pytest.fixture
def real(monkeypatch):
    """DataModule factory on the real data, decoded once per test session; small train/val splits."""
    monkeypatch.setattr(syn, "load_fashion_mnist", lambda root, cache_dir, split, download: _load(split))

    def make(cls, **kw):
        dm = cls(**{"val_size": 200, "train_subset": 300, "download": False, **kw})
        dm.setup()
        return dm

    return make


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """DataModule factory on a 60/20-image fake IDX folder (noise images, labels i % 10)."""
    monkeypatch.setattr("siftguide.data.formats.DEBIAN_FASHION_MNIST", str(tmp_path / "absent"))
    write_idx(tmp_path / "fm", n_train=60, n_test=20)

    def make(cls, **kw):
        dm = cls(**{"root": str(tmp_path / "fm"), "cache_dir": str(tmp_path), "val_size": 10, "download": False,
                    **kw})
        dm.setup()
        return dm

    return make


def corner_squares(images: torch.Tensor, size: int, margin: int) -> torch.Tensor:
    """``(N, 4, size, size)`` the four corner squares (0 TL, 1 TR, 2 BL, 3 BR) of ``(N, 1, H, W)``."""
    h, w = images.shape[-2:]
    lo, hi_y, hi_x = margin, h - margin - size, w - margin - size
    return torch.stack([images[:, 0, y : y + size, x : x + size] for y, x in
                        ((lo, lo), (lo, hi_x), (hi_y, lo), (hi_y, hi_x))], 1)


# --- pure functions ----------------------------------------------------------------------------------------------
def test_resize_matrix_identity_and_mass():
    assert torch.equal(syn.resize_matrix(28, 28), torch.eye(28))
    for s in (14, 24, 44):  # each output pixel is a weighted mean of source pixels; enlarging is bilinear
        r = syn.resize_matrix(28, s)
        assert r.shape == (s, 28) and (r >= 0).all() and torch.allclose(r.sum(1), torch.ones(s))
    x = torch.rand(1, 1, 28, 28)
    for s in (14, 44):
        ref = torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", antialias=s < 28, align_corners=False)
        r = syn.resize_matrix(28, s)
        assert torch.allclose(r @ x[0, 0] @ r.T, ref[0, 0], atol=1e-5)


def test_place_garments_positions_and_sizes():
    img = torch.full((3, 1, 28, 28), 200, dtype=torch.uint8)
    size, xy = torch.tensor([24, 28, 44]), torch.tensor([[0, 0], [10, 30], [20, 5]])
    out = syn.place_garments(img, size, xy, 64)
    assert out.shape == (3, 1, 64, 64) and out.dtype == torch.uint8
    for k in range(3):
        ys, xs = out[k, 0].nonzero().unbind(1)
        assert (xs.min(), ys.min()) == tuple(xy[k]) and xs.max() - xs.min() + 1 == size[k] == ys.max() - ys.min() + 1
    assert syn.place_garments(img.float() / 255, size, xy, 64).dtype == torch.float32
    with pytest.raises(ValueError, match="inside the 64 px canvas"):
        syn.place_garments(img[:1], torch.tensor([44]), torch.tensor([[30, 0]]), 64)


def test_paste_clutter_blends():
    canvas = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    canvas[..., 4:8, 4:8] = 200                                  # an opaque "garment"
    sources = torch.full((2, 1, 28, 28), 100, dtype=torch.uint8)
    kw = dict(src_index=torch.tensor([[1]]), crop_size=torch.tensor([[6]]), crop_xy=torch.tensor([[[3, 3]]]),
              xy=torch.tensor([[[2, 2]]]))
    over = syn.paste_clutter(canvas, sources, **kw)
    assert over[0, 0, 2:8, 2:8].eq(100).sum() == 36 - 16 and over[0, 0, 4:8, 4:8].eq(200).all()  # garment in front
    assert over.sum() - canvas.sum() == 100 * 20 and over[0, 0, 8:].eq(0).all()
    dark = canvas // 4                                            # 50 < 100: max lets the clutter through
    assert syn.paste_clutter(dark, sources, blend="max", **kw)[0, 0, 4:8, 4:8].eq(100).all()
    assert syn.paste_clutter(dark, sources, blend="over", **kw)[0, 0, 4:8, 4:8].eq(50).all()


def test_tint_is_sift_invisible_and_decoy_is_visible():
    codes = torch.arange(10)
    tint = syn.add_tint(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), syn.artefact_levels(codes, 10, 12))
    assert tint[:, 0, 0, 0].tolist() == [10 + 12 * c for c in range(10)] and (tint.amin((1, 2, 3)) ==
                                                                              tint.amax((1, 2, 3))).all()
    decoy = syn.add_decoy(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), syn.artefact_levels(codes, 255, -25),
                          codes % 4, size=4, margin=2)
    assert decoy.count_nonzero((1, 2, 3)).eq(16).all()
    # as the model sees them: resized to 64 px like DeviceTransform does before the relevance stage
    resize = DeviceTransform(64).resize
    for x in (tint, tint.float() / 255):  # the uint8 dataset images and the float [0, 1] ones
        assert not detect_keypoints(resize(x)).valid.any()
    kp = detect_keypoints(resize(decoy))
    assert kp.valid.any(1).all()  # every class level gives keypoints
    lo, hi = [(c + 0.5) * 64 / 28 - 0.5 for c in (3.5, 23.5)]  # square centres, 28 px -> 64 px pixel coordinates
    corner = torch.tensor([[lo, lo], [hi, lo], [lo, hi], [hi, hi]])[codes % 4]
    dist = (kp.xy - corner[:, None]).norm(dim=-1)
    assert (dist[kp.valid] < 8).all()  # ... on the square


def test_composite_over_keeps_opaque_garment_and_black_background():
    front = torch.tensor([0.0, 0.05, 0.1, 0.8])
    out = syn.composite_over(front, torch.tensor(0.5))
    assert torch.allclose(out, torch.tensor([0.5, 0.3, 0.1, 0.8]))
    assert torch.equal(syn.composite_over(front, torch.tensor(0.0)), front)


# --- DataModules -------------------------------------------------------------------------------------------------
def test_same_split_as_fashion_mnist_and_identity_layout(fake):
    base = fake(FashionMNISTDataModule)
    same = fake(syn.TranslatedFashionMNISTDataModule, canvas_size=28, min_size=28, max_size=28)
    for a, b in ((base.train_set, same.train_set), (base.val_set, same.val_set), (base.test_set, same.test_set)):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)  # 28 on 28: the plain images
    dm = fake(syn.ClutteredFashionMNISTDataModule, train_subset=16, batch_size=4)
    assert len(dm.train_set) == 16 and len(dm.val_set) == 10 and len(dm.test_set) == 20
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 64, 64) and batch["image"].dtype == torch.uint8


@pytest.mark.parametrize("cls", VARIANTS.values(), ids=VARIANTS.keys())
def test_deterministic_per_index_and_split_seed(fake, cls):
    a, b = fake(cls), fake(cls, train_subset=12)
    assert torch.equal(a.train_set.images[:12], b.train_set.images)  # same index, same image, any subset
    assert torch.equal(a.val_set.images, b.val_set.images) and torch.equal(a.test_set.images, b.test_set.images)
    c = fake(cls, split_seed=1)
    assert not torch.equal(a.val_set.images, c.val_set.images)
    assert not torch.equal(a.test_set.images, c.test_set.images)  # the test set is not split: new draws


@real_data
def test_translated_garments_vary_in_place_and_size_and_clutter_adds_mass(real):
    t = real(syn.TranslatedFashionMNISTDataModule)
    x = t.train_set.images[:, 0].float()
    assert x.shape == (300, 64, 64)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    mass = x.sum((1, 2))
    cx, cy = (x * xx).sum((1, 2)) / mass, (x * yy).sum((1, 2)) / mass
    assert cx.std() > 4 and cy.std() > 4 and cx.min() < 24 and cx.max() > 40  # garments spread over the canvas
    rows = (x > 0).any(2).float()                                               # (N, 64) rows holding the garment
    height = 64 - rows.argmax(1) - rows.flip(1).argmax(1)
    assert height.min() <= 28 and height.max() >= 40                            # sizes 24..44 (minus blank rows)
    c = real(syn.ClutteredFashionMNISTDataModule)
    extra = c.train_set.images.int() - t.train_set.images.int()
    assert (extra >= 0).all()                                                   # clutter only adds, garment in front
    outside = (extra > 0) & (t.train_set.images == 0)                           # new mass where no garment was
    assert outside.any(-1).any(-1).float().mean() > 0.9
    none = real(syn.ClutteredFashionMNISTDataModule, clutter_count=0)
    assert torch.equal(none.train_set.images, t.train_set.images)


def test_object_scale_sets_the_size_range_as_a_share_of_the_canvas(fake):
    """data.object_scale=[low, high]: garment sides round(low * C)..round(high * C), the same images as the pixel
    range it stands for (the default variants unchanged)."""
    small = fake(syn.TranslatedFashionMNISTDataModule, object_scale=[0.2, 0.35])
    assert (small.min_size, small.max_size) == (13, 22)
    px = fake(syn.TranslatedFashionMNISTDataModule, min_size=13, max_size=22)
    assert torch.equal(small.train_set.images, px.train_set.images)
    sizes = small.draw_params(60, "train", torch.zeros(60))["size"]
    assert sizes.min() >= 13 and sizes.max() <= 22 and len(sizes.unique()) > 4
    default = fake(syn.TranslatedFashionMNISTDataModule)
    assert (default.min_size, default.max_size) == (24, 44)
    clutter = fake(syn.ClutteredFashionMNISTDataModule, object_scale=[0.5, 0.5])
    assert (clutter.min_size, clutter.max_size) == (32, 32)
    for bad in ([0.0, 0.3], [0.4, 0.3], [0.5, 1.2], [0.3]):
        with pytest.raises(ValueError, match="data.object_scale"):
            syn.TranslatedFashionMNISTDataModule(object_scale=bad)


def _tint_codes(images):
    """Class code of each tinted image read off its (background) top-left pixel; -1 when no level matches."""
    level = images[:, 0, 0, 0].long()
    code = (level - 10) // 12
    return torch.where(((level - 10) % 12 == 0) & (level >= 10), code, -1)


def _decoy_codes(images):
    """Class code of each decoy image: the grey of its uniform, non-black corner square; -1 when none."""
    sq = corner_squares(images, 4, 2).flatten(2).long()                        # (N, 4, 16)
    uniform = (sq.amin(-1) == sq.amax(-1)) & (sq[..., 0] > 0)                  # (N, 4)
    level = torch.where(uniform, sq[..., 0], 0).amax(1)
    return torch.where(level > 0, (255 - level) // 25, -1)


@real_data
@pytest.mark.parametrize("cls,codes", [(syn.TintedFashionMNISTDataModule, _tint_codes),
                                       (syn.DecoyFashionMNISTDataModule, _decoy_codes)], ids=["tint", "decoy"])
def test_artefact_encodes_label_in_train_only(real, cls, codes):
    dm = real(cls)
    for ds in (dm.train_set, dm.val_set):
        assert (codes(ds.images) == ds.labels).float().mean() > 0.97
    test_codes, labels = codes(dm.test_set.images), dm.test_set.labels
    assert (test_codes >= 0).float().mean() > 0.97                             # the artefact is there...
    assert abs((test_codes == labels).float().mean() - 0.1) < 0.03             # ... but says nothing of the label
    assert test_codes[test_codes >= 0].bincount(minlength=10).min() > 120      # every level used (~200 each)
    corr = real(cls, test_artefact="correlated")
    assert (codes(corr.test_set.images) == labels).float().mean() > 0.97
    plain = real(cls, test_artefact="none")
    assert torch.equal(plain.test_set.images, _load("test")[0])                # no artefact: the plain images
    assert torch.equal(plain.train_set.images, dm.train_set.images)


@pytest.mark.parametrize("cls,kw,match", [
    (syn.TranslatedFashionMNISTDataModule, dict(min_size=30, max_size=20), "data.min_size=30"),
    (syn.TranslatedFashionMNISTDataModule, dict(max_size=70), "data.max_size=70 does not fit"),
    (syn.TranslatedFashionMNISTDataModule, dict(min_size=0), "1 <= min_size"),
    (syn.TranslatedFashionMNISTDataModule, dict(min_size=24.5), "whole number"),
    (syn.ClutteredFashionMNISTDataModule, dict(clutter_count=-1), "data.clutter_count must be >= 0"),
    (syn.ClutteredFashionMNISTDataModule, dict(clutter_min=12, clutter_max=10), "clutter_min <= clutter_max"),
    (syn.ClutteredFashionMNISTDataModule, dict(clutter_max=30), "data.clutter_max <= 28"),
    (syn.ClutteredFashionMNISTDataModule, dict(clutter_blend="add"), "data.clutter_blend"),
    (syn.TintedFashionMNISTDataModule, dict(test_artefact="shuffled"), "data.test_artefact"),
    (syn.TintedFashionMNISTDataModule, dict(level_step=30), r"levels 10\.\.280"),
    (syn.DecoyFashionMNISTDataModule, dict(decoy_size=27), "decoy_size \\+ decoy_margin <= data.canvas_size"),
])
def test_bad_settings_are_named(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(**kw)


@pytest.mark.parametrize("name", VARIANTS)
def test_configs_compose_and_instantiate(tmp_path, name):
    cfg = compose_cfg(tmp_path, [f"data={name}"])
    dm = instantiate(cfg.data)
    assert type(dm) is VARIANTS[name] and dm.train_subset == 256 and dm.val_size == 128

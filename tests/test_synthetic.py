"""The synthetic MVTec-layout dataset: layout, exact masks, determinism, thin scratches."""
import cv2
import numpy as np
import pytest

from fae_fast import synthetic
from fae_fast.synthetic import DEFECT_TYPES, make_dataset

SIZE = (48, 64)  # (H, W), non-square on purpose


def _read(p):
    img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    assert img is not None, p
    return img


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synth") / "cat", n_train=4, n_test_good=3, n_test_defect=4,
                        size=SIZE, seed=3)


def test_layout(small):
    assert sorted(p.name for p in (small / "train").iterdir()) == ["good"]
    assert sorted(p.name for p in (small / "test").iterdir()) == sorted(("good",) + DEFECT_TYPES)
    assert sorted(p.name for p in (small / "ground_truth").iterdir()) == sorted(DEFECT_TYPES)
    assert len(list((small / "train" / "good").glob("*.png"))) == 4
    assert len(list((small / "test" / "good").glob("*.png"))) == 3
    for p in (small / "train" / "good").glob("*.png"):
        img = _read(p)
        assert img.shape == SIZE + (3,) and img.dtype == np.uint8
    for d in DEFECT_TYPES:
        imgs = sorted((small / "test" / d).glob("*.png"))
        assert len(imgs) == 4
        for p in imgs:
            mask = _read(small / "ground_truth" / d / f"{p.stem}_mask.png")
            assert _read(p).shape == SIZE + (3,)
            assert mask.shape == SIZE and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255}
            assert (mask > 0).sum() > 0, f"empty mask for {p}"


def test_images_differ_but_share_a_distribution(small):
    imgs = [(_read(p).astype(np.float32) / 255) for p in sorted((small / "train" / "good").glob("*.png"))]
    for a, b in zip(imgs, imgs[1:]):
        assert np.abs(a - b).mean() > 0.02  # every image is different
    means = [im.mean() for im in imgs]
    assert 0.3 < min(means) and max(means) < 0.75


def test_deterministic(tmp_path):
    a = make_dataset(tmp_path / "a", n_train=2, n_test_good=1, n_test_defect=1, size=SIZE, seed=5)
    b = make_dataset(tmp_path / "b", n_train=2, n_test_good=1, n_test_defect=1, size=SIZE, seed=5)
    c = make_dataset(tmp_path / "c", n_train=2, n_test_good=1, n_test_defect=1, size=SIZE, seed=6)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    for f in files:
        assert np.array_equal(_read(a / f), _read(b / f)), f
    assert not np.array_equal(_read(a / files[-1]), _read(c / files[-1]))


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_masks_are_exact(kind):
    """The defect changes the image inside its mask; outside, only sensor noise differs (stains: soft edges)."""
    rng = np.random.default_rng(0)
    inside, outside = [], []
    for i in range(6):
        clean = synthetic.surface(np.random.default_rng(i), (64, 64))
        img = clean.copy()
        mask = synthetic.add_defect(img, kind, rng)
        d = np.abs(img - clean).max(axis=2)
        inside.append(d[mask].mean())
        far = ~cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        outside.append(d[far].max() if far.any() else 0.0)
        if kind != "stain":  # hard-edged defects change nothing outside their drawn pixels
            assert d[~mask].max() == 0.0, f"{kind}: pixels changed outside the mask"
    assert min(inside) > 0.04, f"{kind}: too faint inside its mask ({min(inside):.3f})"
    assert max(outside) < 0.01, f"{kind}: changes far outside its mask"


def test_thin_scratches_present():
    rng = np.random.default_rng(1)
    half_widths = []
    for i in range(12):
        img = synthetic.surface(np.random.default_rng(100 + i), (96, 96))
        mask = synthetic.add_defect(img, "scratch", rng)
        dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
        half_widths.append(float(dist.max()))
        assert mask.sum() > 10 * dist.max() ** 2, "a scratch must be long and thin, not a blob"
    assert max(half_widths) <= 2.5  # at most ~3 px wide (plus curve rasterisation)
    assert min(half_widths) <= 1.0  # and some are a single pixel wide


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown defect"):
        make_dataset(tmp_path, n_train=1, defects=("dent",))
    with pytest.raises(ValueError, match="size"):
        make_dataset(tmp_path, size=(8, 8))
    with pytest.raises(ValueError, match="n_train"):
        make_dataset(tmp_path, n_train=-1)


def test_an_existing_dataset_is_replaced_only_when_asked(tmp_path):
    root = synthetic.make_dataset(tmp_path / "d", n_train=3, n_test_good=1, n_test_defect=1, size=(16, 16))
    with pytest.raises(ValueError, match="not empty"):
        synthetic.make_dataset(root, n_train=1, n_test_good=1, n_test_defect=1, size=(16, 16))
    (root / "notes.txt").write_text("mine")
    synthetic.make_dataset(root, n_train=1, n_test_good=1, n_test_defect=1, size=(16, 16), overwrite=True)
    assert len(list((root / "train" / "good").glob("*.png"))) == 1  # nothing left from the first run
    assert (root / "notes.txt").read_text() == "mine"
    assert not list(root.rglob(".*.tmp"))

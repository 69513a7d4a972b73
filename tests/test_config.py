"""FAEConfig: validation of every value before any work, layering (preset -> file -> flags), the auto size."""
import copy
import math
import pathlib

import cv2
import numpy as np
import pytest
import torch

from fae_fast import Detector
from fae_fast.api import resolve_auto_size
from fae_fast.config import FAEConfig, auto_size, parse_size, preset
from fae_fast.train import train


@pytest.mark.parametrize("name", ["default", "fast", "tiny"])
def test_presets_are_valid(name):
    assert preset(name).validate() is not None


@pytest.mark.parametrize("key, value, exc, match", [
    ("train.threshold_quantile", 2.0, ValueError, r"train\.threshold_quantile must be in \[0, 1\], got 2\.0"),
    ("train.pixel_threshold_quantile", -0.1, ValueError, "train.pixel_threshold_quantile"),
    ("train.batch_size", 0, ValueError, r"train\.batch_size must be in \[1, inf\), got 0"),
    ("train.lr", 0.0, ValueError, r"train\.lr must be in \(0, inf\), got 0\.0"),
    ("train.steps", 0, ValueError, "train.steps"),
    ("train.steps", -3, ValueError, "train.steps"),
    ("train.lr", "fast", TypeError, "train.lr must be a finite number, got 'fast'"),
    ("train.lr", math.nan, TypeError, "train.lr"),
    ("noise.sigma_max", math.inf, TypeError, "noise.sigma_max"),
    ("train.steps", 1.5, TypeError, "train.steps must be an integer"),
    ("train.steps", True, TypeError, "train.steps must be an integer"),
    ("train.augment_flip", "yes", TypeError, "train.augment_flip must be true or false"),
    ("train.holdout_fraction", 1.0, ValueError, "train.holdout_fraction"),
    ("train.image_size", (4, 4), ValueError, "train.image_size"),
    ("train.image_size", (256, 9000), ValueError, "train.image_size"),
    ("train.image_size", "big", ValueError, "train.image_size"),
    ("train.amp", "fp8", ValueError, "train.amp must be one of"),
    ("noise.mode", "both", ValueError, "noise.mode must be one of"),
    ("model.widths", (), ValueError, "model.widths"),
    ("model.widths", (8, "a"), TypeError, "model.widths"),
    ("model.norm", "layer", ValueError, "model.norm"),
    ("map.k", 6, ValueError, "map.k must be odd"),
    ("map.template_n", -1, ValueError, r"map\.template_n must be in \[0, inf\), got -1"),
    ("map.template_n", 1.5, TypeError, "map.template_n must be an integer"),
    ("model.members", 0, ValueError, r"model\.members must be in \[1, 8\], got 0"),
    ("model.members", 9, ValueError, r"model\.members must be in \[1, 8\], got 9"),
    ("corruption.p", 1.5, ValueError, "corruption.p"),
    ("corruption.k_min", 4, ValueError, r"corruption\.k_min \(4\) must be <= corruption\.k_max \(3\)"),
    ("corruption.perlin_coverage", (0.2, 0.1), ValueError, "corruption.perlin_coverage"),
    ("corruption.stroke_width", (1.0,), TypeError, "corruption.stroke_width must be a pair"),
    ("corruption.texture_dir", 3, TypeError, "corruption.texture_dir must be a string"),
    ("corruption.texture_dir", "/no/such/folder", ValueError, "corruption.texture_dir: no such folder"),
    ("corruption.perlin_coverage", (0.1, 1.5), ValueError, "corruption.perlin_coverage"),
])
def test_validate_names_the_key_and_the_value(key, value, exc, match):
    cfg = FAEConfig()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(exc, match=match):
        cfg.validate()


def test_at_least_one_occlusion_shape_and_texture_source():
    cfg = FAEConfig()
    cfg.corruption.w_other_image = cfg.corruption.w_procedural = cfg.corruption.w_self = 0.0
    with pytest.raises(ValueError, match="no texture source"):
        cfg.validate()
    cfg = FAEConfig()
    cfg.corruption.w_perlin = cfg.corruption.w_polygon = cfg.corruption.w_stroke = 0.0
    with pytest.raises(ValueError, match="no occlusion shape"):
        cfg.validate()


def test_none_where_allowed_and_zero_steps_only_on_request():
    cfg = FAEConfig()
    cfg.corruption.capacity_sigmas, cfg.train.image_size = None, "auto"
    cfg.validate()
    cfg.train.steps = 0
    with pytest.raises(ValueError, match="train.steps"):
        cfg.validate()
    cfg.validate(allow_zero_steps=True)


def test_from_dict_layers_on_the_base_without_touching_it():
    base = preset("tiny")
    before = copy.deepcopy(base)
    cfg = FAEConfig.from_dict({"noise": {"mode": "input"}, "train": {"lr": 1e-3}}, base=base)
    assert cfg.model.widths == (16, 32, 64, 128) and cfg.train.image_size == (128, 128)  # the preset's
    assert cfg.noise.mode == "input" and cfg.train.lr == 1e-3 and cfg.noise.sigma_max == 0.1
    assert base == before
    assert FAEConfig.from_dict(cfg.to_dict()) == cfg  # a full dict still round-trips
    assert FAEConfig.from_dict({"noise": {"mode": "none"}}).model.widths == (64, 128, 256, 512)


@pytest.mark.parametrize("d, exc, match", [
    ([{"train": {}}], TypeError, "must be an object of sections.*got list"),
    ({"train": [1, 2]}, TypeError, "section 'train' must be an object"),
    ({"trian": {}}, ValueError, "unknown config sections"),
    ({"train": {"stpes": 3}}, ValueError, "stpes"),
])
def test_from_dict_refuses_what_is_not_a_config(d, exc, match):
    with pytest.raises(exc, match=match):
        FAEConfig.from_dict(d)


def test_train_and_fit_validate_before_any_work(tmp_path):
    cfg = preset("tiny")
    cfg.train.threshold_quantile = 2.0
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    cfg.train.image_size = (32, 32)
    with pytest.raises(ValueError, match="threshold_quantile"):
        train(cfg, images, progress=False)
    # the folder does not exist: the config error comes first, before any image is looked for
    with pytest.raises(ValueError, match="threshold_quantile"):
        Detector(cfg, device="cpu").fit(tmp_path / "missing", progress=False)
    with pytest.raises(ValueError, match="train.steps"):
        Detector(preset("tiny"), device="cpu").fit(tmp_path / "missing", steps=0, progress=False)


# ------------------------------------------------------------------------------------------------ sizes


def test_size_bounds():
    assert parse_size("8x8192") == (8, 8192)
    with pytest.raises(ValueError, match="8192"):
        parse_size("16x8193")
    for h, w in [(1, 4000), (4000, 1), (1, 10 ** 6), (3, 3)]:
        ah, aw = auto_size(h, w)
        assert 16 <= ah <= 8192 and 16 <= aw <= 8192 and ah % 16 == 0 and aw % 16 == 0


def _png(path: pathlib.Path, h: int, w: int) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imencode(".png", np.full((h, w), 100, np.uint8))[1].tofile(str(path))
    return path


def test_auto_size_takes_the_median_ratio_of_all_images(tmp_path):
    """One 1 x 4000 strip sorting first must not decide the size of a set of 460 x 1130 frames."""
    _png(tmp_path / "a_strip.png", 1, 4000)
    for i in range(4):
        _png(tmp_path / f"frame{i}.png", 46, 113)
    with pytest.warns(UserWarning, match=r"1 of 5 training images.*a_strip\.png"):
        assert resolve_auto_size(tmp_path, 256 * 256) == (160, 400) == auto_size(460, 1130)


def test_auto_size_warns_when_the_ratio_is_too_extreme(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", 1, 4000)
    with pytest.warns(UserWarning, match="too extreme"):
        h, w = resolve_auto_size(tmp_path, 256 * 256)
    assert (h, w) == (16, 8192)


@pytest.mark.parametrize("data", [[], np.zeros((0, 32, 32, 3), np.uint8), torch.zeros(0, 3, 32, 32)])
def test_fit_on_zero_images_says_so(data):
    with pytest.raises(ValueError, match="no training images"):
        resolve_auto_size(data, 64 * 64)
    with pytest.raises(ValueError, match="no training images"):
        Detector(preset("tiny"), device="cpu").fit(data, image_size="auto", progress=False)

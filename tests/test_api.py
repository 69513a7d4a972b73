"""The public API: Detector.fit / predict / save / load with every kind of input, and to_uint8_batch."""
import numpy as np
import pytest
import torch

from fae_fast import Detector, Prediction
from fae_fast.api import resolve_auto_size, to_uint8_batch
from fae_fast.config import auto_size, preset


@pytest.fixture(scope="module")
def det():
    cfg = preset("tiny")
    cfg.train.steps, cfg.train.batch_size, cfg.train.image_size = 2, 4, (32, 48)
    imgs = (torch.rand(10, 3, 32, 48) * 255).to(torch.uint8)
    return Detector(cfg, device="cpu").fit(imgs, progress=False)


def test_fit_sets_thresholds_and_predict_takes_numpy_single_and_batch(det):
    assert det.thresholds["image"] is not None and det.thresholds["pixel"] is not None
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    res = det.predict(one)
    assert isinstance(res, Prediction) and len(res) == 1
    assert isinstance(res.pred_score, np.ndarray) and res.anomaly_map.shape == (1, 32, 48)
    assert res.pred_mask.dtype == bool and res.pred_label.dtype == bool
    batch = np.stack([one, one[::-1].copy()])
    res2 = det.predict(batch)
    assert res2.pred_score.shape == (2,)
    np.testing.assert_allclose(res2.pred_score[0], res.pred_score[0], rtol=1e-5)


def test_predict_takes_torch_float_grey_and_other_sizes(det):
    x = torch.rand(3, 64, 96)                        # float CHW, resized to the model's 32 x 48
    res = det.predict(x)
    assert isinstance(res.pred_score, torch.Tensor) and res.anomaly_map.shape == (1, 32, 48)
    grey = np.full((32, 48), 128, np.uint8)
    assert det.predict(grey).anomaly_map.shape == (1, 32, 48)
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\]"):
        det.predict(torch.full((3, 32, 48), 2.0))
    with pytest.raises(ValueError, match="expected"):
        det.predict(np.zeros((32, 48, 5), np.uint8))


def test_thresholds_override_per_call_without_changing_the_stored_ones(det):
    x = np.zeros((32, 48, 3), np.uint8)
    stored = dict(det.thresholds)
    lo = det.predict(x, image_threshold=-1.0, pixel_threshold=-1.0)
    assert lo.pred_label.all() and lo.pred_mask.all()
    hi = det.predict(x, image_threshold=1e9, pixel_threshold=1e9)
    assert not hi.pred_label.any() and not hi.pred_mask.any()
    assert det.thresholds == stored


def test_save_load_round_trip(det, tmp_path):
    x = (torch.rand(2, 3, 32, 48) * 255).to(torch.uint8)
    path = det.save(tmp_path / "m.fae")
    back = Detector.load(path, device="cpu")
    assert back.image_size == (32, 48) and back.thresholds == det.thresholds
    torch.testing.assert_close(back.predict(x).pred_score, det.predict(x).pred_score)


def test_untrained_detector_says_so():
    with pytest.raises(RuntimeError, match="no trained model"):
        Detector(device="cpu").predict(np.zeros((8, 8, 3), np.uint8))


def test_auto_size_keeps_the_aspect_ratio():
    assert auto_size(460, 1130) == (160, 400)
    assert auto_size(460, 1130, 128 * 128) == (80, 208)
    assert resolve_auto_size(np.zeros((2, 460, 1130, 3), np.uint8), 256 * 256) == (160, 400)
    assert resolve_auto_size(torch.zeros(2, 3, 100, 100), 64 * 64) == (64, 64)


def test_to_uint8_batch_layouts():
    hwc = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    b, kind = to_uint8_batch(hwc, (3, 4))
    assert kind == "numpy" and b.shape == (2, 3, 3, 4)
    assert torch.equal(b[1].permute(1, 2, 0), torch.from_numpy(hwc[1]))
    b16, _ = to_uint8_batch((hwc.astype(np.uint16) * 257), (3, 4))
    assert torch.equal(b16, b)
    # 16-bit values between multiples of 257 round like the file reader: 200 -> 1, 128 -> 0, 65535 -> 255
    odd = np.array([[[200, 128, 65535]]], dtype=np.uint16)
    assert to_uint8_batch(odd, (1, 1))[0].flatten().tolist() == [1, 0, 255]
    with pytest.raises(TypeError, match="unsupported image input"):
        to_uint8_batch({"a": 1}, (3, 4))

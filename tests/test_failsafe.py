"""Fail safe (issue 11, item 2): a NaN/Inf or unscaled float frame, a model that outputs NaN, or a non-finite
threshold never turns into a "good part".

The behaviour under test: ``Engine.predict`` and ``Detector.predict`` / ``fit`` raise ValueError naming the first
bad image; ``InlineStream`` (which must answer every frame) answers such a frame with ``pred_score = inf``,
``pred_label = True`` and a ``reason``; a non-finite score or map pixel is always above the threshold;
non-finite thresholds are refused everywhere.
"""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from fae_fast import Detector
from fae_fast.checkpoint import save_model_file
from fae_fast.config import preset
from fae_fast.inference import Engine, InlineStream
from tests.test_api import det  # noqa: F401  (a module-scoped fixture shared with the API tests)
from tests.test_engine import K_SMOOTH, N_SMOOTH, H, W, frames, tiny_model
from tests.test_stream import cuda_engine, engine  # noqa: F401  (the stream tests' engines)

NAN, INF = float("nan"), float("inf")


class NaNWhereMarked(nn.Module):
    """Wraps a network: the reconstruction of every image whose first pixel is exactly 0 is all NaN (a model that
    breaks on some inputs: an fp16 overflow, corrupted weights)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.where(x[:, :1, :1, :1] == 0, NAN, self.net(x))


def mark(x: torch.Tensor, i: int) -> torch.Tensor:
    """uint8 (B, C, H, W) batch whose image i is marked for NaNWhereMarked (the others are not)."""
    x = x.clone()
    x[:, 0, 0, 0] = 1
    x[i, 0, 0, 0] = 0
    return x


@pytest.fixture(scope="module")
def nan_engine():
    return Engine(NaNWhereMarked(tiny_model()), image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu",
                  fold_bn=False, thresholds={"image": 1e-3, "pixel": 5e-4})


def float_frames(b=4, seed=3):
    return frames(b, seed=seed).float() / 255


BAD_VALUES = [(NAN, "NaN"), (INF, "Inf"), (-INF, "Inf"), (200.0, r"outside \[0, 1\]"), (-0.5, r"outside \[0, 1\]")]


# ---------------------------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("value, what", BAD_VALUES)
def test_engine_predict_refuses_bad_float_frames(engine, value, what):
    x = float_frames()
    x[2, 1, 5, 7] = value
    with pytest.raises(ValueError, match=rf"frame 2 .*{what}"):
        engine.predict(x)
    nhwc = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())  # numpy camera layout
    with pytest.raises(ValueError, match=rf"frame 2 .*{what}"):
        engine.predict(nhwc)
    with pytest.raises(ValueError, match=rf"frame 0 .*{what}"):
        engine.predict(x[2])  # a single (C, H, W) frame
    assert engine.predict(x[:2]).pred_score.shape == (2,)  # the good frames still score


def test_engine_refuses_unscaled_float_frames(engine):
    x = frames(2, seed=4).float()  # 0..255, not divided by 255
    with pytest.raises(ValueError, match=r"frame 0 .*range \[0, 255\].*\[0, 1\]"):
        engine.predict(x)


def test_engine_model_nan_is_anomalous(nan_engine):
    x = mark(frames(3, seed=5), 1)
    r = nan_engine.predict(x)
    assert math.isnan(float(r.pred_score[1])) and torch.isnan(r.anomaly_map[1]).all()
    assert r.pred_label[1] and r.pred_mask[1].all()  # never "good"
    assert torch.equal(r.pred_label[[0, 2]], r.pred_score[[0, 2]] > 1e-3)  # the others as usual
    r = nan_engine.predict(x, return_map=False)
    assert r.pred_label[1] and r.pred_mask[1].all()


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_engine_refuses_non_finite_thresholds(engine, bad):
    with pytest.raises(ValueError, match="image threshold"):
        Engine(tiny_model(), image_size=(H, W), device="cpu", thresholds={"image": bad})
    with pytest.raises(ValueError, match="pixel"):
        engine.set_thresholds(pixel=bad)
    with pytest.raises(ValueError, match="image_threshold"):
        engine.predict(frames(1), image_threshold=bad)
    with pytest.raises(ValueError, match="pixel_threshold"):
        engine.predict(frames(1), pixel_threshold=bad)
    assert engine.thresholds == {"image": 1e-3, "pixel": 5e-4}


def test_model_file_with_non_finite_thresholds_is_refused(det, tmp_path):
    path = tmp_path / "nan.fae"
    save_model_file(path, model_state=det.model.state_dict(), config=det.config, image_size=det.image_size,
                    thresholds={"image": NAN, "pixel": 0.01})
    with pytest.raises(ValueError, match=r"nan\.fae.*image threshold"):
        Detector.load(path, device="cpu")
    with pytest.raises(ValueError, match=r"nan\.fae.*image threshold"):
        Engine.from_model_file(path, device="cpu")
    eng = Engine.from_model_file(path, device="cpu", thresholds={"image": 0.5})  # given ones replace them
    assert eng.thresholds == {"image": 0.5, "pixel": None}
    save_model_file(path, model_state=det.model.state_dict(), config=det.config, image_size=det.image_size,
                    thresholds={"image": 0.01, "pixel": INF})
    with pytest.raises(ValueError, match=r"nan\.fae.*pixel threshold"):
        Detector.load(path, device="cpu")


# ---------------------------------------------------------------------------------------------------- stream
@pytest.mark.parametrize("value, what", BAD_VALUES)
def test_stream_flags_bad_float_frames_in_place(engine, value, what):
    x = float_frames(5, seed=6)
    ref = engine.predict(x)
    imgs = [np.ascontiguousarray(f.permute(1, 2, 0).numpy()) for f in x]
    imgs[1] = imgs[1].copy()
    imgs[1][3, 4, 0] = value
    with InlineStream(engine, input_dtype=np.float32, max_batch=8, max_delay_ms=50, return_map=True) as s:
        s.submit_many(imgs)
        got = [s.get(timeout=60) for _ in range(5)]
    assert [r.index for r in got] == list(range(5))  # answered in place: nothing lost, nothing raised
    bad = got[1]
    assert bad.pred_score == INF and bad.pred_label is True and bad.pred_mask.all()
    assert bad.reason is not None and "frame 1" in bad.reason
    assert re.search(what, bad.reason), bad.reason
    for r in got[:1] + got[2:]:
        assert r.reason is None and r.pred_label == bool(ref.pred_label[r.index])
        assert abs(r.pred_score - float(ref.pred_score[r.index])) <= 1e-6 * max(1.0, r.pred_score)


def test_stream_flags_bad_frames_without_thresholds(engine):
    x = float_frames(2, seed=7)
    imgs = [np.ascontiguousarray(f.permute(1, 2, 0).numpy()) for f in x]
    imgs[0] = imgs[0] * 255  # unscaled
    no_thr = Engine(engine.model, image_size=(H, W), fold_bn=False, n=N_SMOOTH, k=K_SMOOTH, device="cpu")
    with InlineStream(no_thr, input_dtype=np.float32, max_delay_ms=0) as s:
        s.submit_many(imgs)
        a, b = s.get(timeout=60), s.get(timeout=60)
    assert a.pred_label is True and a.pred_score == INF and "outside [0, 1]" in a.reason
    assert b.pred_label is None and b.reason is None and math.isfinite(b.pred_score)


def test_stream_model_nan_is_anomalous_with_a_reason(nan_engine):
    x = mark(frames(3, seed=8), 2)
    imgs = [np.ascontiguousarray(f.permute(1, 2, 0).numpy()) for f in x]
    with InlineStream(nan_engine, max_batch=4, max_delay_ms=50) as s:
        s.submit_many(imgs)
        got = [s.get(timeout=60) for _ in range(3)]
    assert got[2].pred_label is True and got[2].pred_mask.all() and not math.isfinite(got[2].pred_score)
    assert "frame 2" in got[2].reason and "score" in got[2].reason
    assert got[0].reason is None and got[1].reason is None


@pytest.mark.parametrize("bad", [NAN, INF])
def test_stream_refuses_non_finite_thresholds(engine, bad):
    with pytest.raises(ValueError, match="image_threshold"):
        InlineStream(engine, image_threshold=bad)
    with InlineStream(engine) as s:
        with pytest.raises(ValueError, match="pixel"):
            s.set_thresholds(pixel=bad)


# ---------------------------------------------------------------------------------------------------- Detector
@pytest.mark.parametrize("value, what", BAD_VALUES)
def test_detector_predict_refuses_bad_float_images(det, value, what):
    x = np.random.default_rng(0).random((3, 32, 48, 3), dtype=np.float32)
    x[1, 2, 3, 0] = value
    with pytest.raises(ValueError, match=rf"image 1 .*{what}"):
        det.predict(x)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    with pytest.raises(ValueError, match=rf"image 1 .*{what}"):
        det.predict(t)
    with pytest.raises(ValueError, match=rf"image 1 .*{what}"):
        det.predict([x[0], x[1]])  # a list of images: the index is the list's


@pytest.mark.parametrize("value", [NAN, INF])
def test_detector_fit_refuses_non_finite_images(value):
    cfg = preset("tiny")
    cfg.train.steps, cfg.train.batch_size, cfg.train.image_size = 2, 4, (32, 48)
    imgs = torch.rand(6, 3, 32, 48)
    imgs[4, 0, 0, 0] = value
    with pytest.raises(ValueError, match=r"image 4 .*(NaN|Inf)"):
        Detector(cfg, device="cpu").fit(imgs, progress=False)


def test_detector_model_nan_is_anomalous(det):
    x = mark(frames(3, seed=9, h=32, w=48), 0)
    broken = Detector(det.config, device="cpu")
    broken.model = NaNWhereMarked(det.model)
    broken.thresholds = dict(det.thresholds)
    r = broken.predict(x)
    assert math.isnan(float(r.pred_score[0])) and r.pred_label[0] and r.pred_mask[0].all()


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_detector_refuses_non_finite_thresholds(det, bad):
    stored = dict(det.thresholds)
    x = np.zeros((32, 48, 3), np.uint8)
    with pytest.raises(ValueError, match="image_threshold"):
        det.predict(x, image_threshold=bad)
    with pytest.raises(ValueError, match="pixel_threshold"):
        det.predict(x, pixel_threshold=bad)
    with pytest.raises(ValueError, match="image threshold"):
        det.set_thresholds(image=bad)
    with pytest.raises(ValueError, match="pixel threshold"):
        det.set_thresholds(pixel=bad)
    with pytest.raises(TypeError, match="image threshold"):
        det.set_thresholds(image="0.1")
    assert det.thresholds == stored


def test_detector_never_keeps_or_saves_a_non_finite_threshold(det, tmp_path, monkeypatch):
    import fae_fast.train as train_mod

    broken = Detector(det.config, device="cpu")
    broken.model, broken.thresholds = det.model, {"image": NAN, "pixel": 0.01}  # set behind the API's back
    with pytest.raises(ValueError, match="stored image threshold"):
        broken.predict(np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="image threshold"):
        broken.save(tmp_path / "m.fae")
    assert not (tmp_path / "m.fae").exists()

    class Diverged:  # what train() returns when the loss went NaN: NaN maps, so NaN quantiles
        model, history, thresholds = det.model, [], {"image": NAN, "pixel": NAN}

    monkeypatch.setattr(train_mod, "train", lambda *a, **k: Diverged())
    fresh = Detector(det.config, device="cpu")
    with pytest.raises(ValueError, match="diverged"):
        fresh.fit(np.zeros((4, 32, 48, 3), np.uint8), progress=False)
    assert fresh.model is None


# ---------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_cuda_stream_and_engine_fail_safe():
    """The overlapped CUDA stream flags bad float frames from the range copied back with the scores; a model that
    breaks is anomalous (the Triton map bounds non-finite errors to 1e30, so its score is huge, not NaN); a bad
    float batch already on the GPU is refused by Engine.predict."""
    eng = cuda_engine()
    dev = eng.device
    x = float_frames(6, seed=10)
    ref = eng.predict(x)
    imgs = [np.ascontiguousarray(f.permute(1, 2, 0).numpy()) for f in x]
    imgs[1] = imgs[1].copy()
    imgs[1][0, 0, 2] = NAN
    imgs[4] = imgs[4] * 255
    with InlineStream(eng, input_dtype=np.float32, max_batch=8, max_delay_ms=0.2, depth=2) as s:
        s.submit_many(imgs)
        got = [s.get(timeout=60) for _ in range(6)]
    assert [r.index for r in got] == list(range(6))
    assert "NaN" in got[1].reason and r"outside [0, 1]" in got[4].reason
    for i in (1, 4):
        assert got[i].pred_label is True and got[i].pred_score == INF and got[i].pred_mask.all()
    for i in (0, 2, 3, 5):
        assert got[i].reason is None and got[i].pred_label == bool(ref.pred_label[i])
    bad = x.to(dev)
    bad[3, 0, 0, 0] = INF
    with pytest.raises(ValueError, match="frame 3 has Inf"):
        eng.predict(bad)

    nan_eng = Engine(NaNWhereMarked(tiny_model()), image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device=dev,
                     fold_bn=False, compile=False, cuda_graphs=False, thresholds={"image": 1e-3, "pixel": 5e-4})
    u = mark(frames(3, seed=11), 1)
    r = nan_eng.predict(u.to(dev))
    assert bool(r.pred_label[1]) and bool(r.pred_mask[1].all())
    with InlineStream(nan_eng, max_delay_ms=0) as s:
        s.submit_many([np.ascontiguousarray(f.permute(1, 2, 0).numpy()) for f in u])
        got = [s.get(timeout=60) for _ in range(3)]
    assert got[1].pred_label is True and got[1].pred_mask.all()

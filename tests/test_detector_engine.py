"""Detector scoring on the CPU through its cached Engine (ONNX Runtime or PyTorch) against the eager path.

The reference is :func:`fae_fast.scoring.compute_maps` (eager fp32, what the Detector ran before and still runs on
CUDA). Tolerance: the engine's documented fp32 bound ``rtol=1e-4, atol=1e-7`` (module doc of
:mod:`fae_fast.inference.engine`) on raw maps; z-score maps carry that bound through ``(map - mean) / scale``.
A 2-step tiny model at 32x32 keeps every test within seconds on 2 cores; each new set of weights costs one ONNX
export (~5 s), so the tests share one trained model.
"""
import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fae_fast import Detector
from fae_fast.api import ENGINE_BACKENDS
from fae_fast.cli import main
from fae_fast.config import preset
from fae_fast.inference import ort
from fae_fast.scoring import compute_maps
from tests.helpers import assert_close

RTOL, ATOL = 1e-4, 1e-7  # the engine's fp32 bound
BACKENDS = ["torch", pytest.param("onnxruntime", marks=pytest.mark.skipif(
    not ort.available(), reason="needs onnxruntime and onnxscript"))]
SIZE = (32, 32)


def tiny_config(normalize: str = "zscore"):
    cfg = preset("tiny")
    cfg.train.steps, cfg.train.batch_size, cfg.train.image_size = 2, 4, SIZE
    cfg.train.holdout_fraction = 0.5  # >= 3 held-out images for the z-score statistics
    cfg.model.residual = False  # errors of a realistic size after 2 steps
    cfg.map.normalize = normalize
    return cfg


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, *SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained():
    return Detector(tiny_config(), device="cpu", engine_backend="torch", threads=1).fit(images(12, 0),
                                                                                        progress=False)


def detector(trained, normalize: str, backend: str) -> Detector:
    """A detector on the trained network and statistics, with its own config, backend and no engine yet."""
    det = Detector(tiny_config(normalize), device="cpu", engine_backend=backend, threads=1)
    det.model, det.map_stats, det.thresholds = trained.model, trained.map_stats, dict(trained.thresholds)
    return det


def eager(det: Detector, x: torch.Tensor, batch_size: int = 32):
    n, k = det.smoothing
    return compute_maps(det.model, x, n=n, k=k, error=det.config.map.error, batch_size=batch_size, device="cpu",
                        amp=det.config.train.amp, normalize=det.config.map.normalize, stats=det.map_stats)


def nudge(model: torch.nn.Module, i: int) -> None:
    """Add 0.25 to the first element of the i-th parameter, in place."""
    t = list(model.parameters())[i]
    with torch.no_grad():
        t[(0,) * t.dim()] += 0.25


def check_parity(det: Detector, x: torch.Tensor, maps, scores, ref_maps, ref_scores) -> None:
    """maps/scores within the fp32 bound of the eager ones; for z-scores the bound of the raw map is carried
    through the normalisation (an absolute error d of the raw map is d / scale in the z-score)."""
    if det.config.map.normalize == "none":
        assert_close(maps, ref_maps, atol=ATOL, rtol=RTOL, msg="map")
        assert_close(scores, ref_scores, atol=ATOL, rtol=RTOL, msg="score")
        return
    raw = copy.copy(det)
    raw.config = copy.deepcopy(det.config)
    raw.config.map.normalize = "none"
    raw_maps, _ = eager(raw, x)
    scale = det.map_stats["scale"]
    bound = (ATOL + RTOL * raw_maps.abs()) / scale + RTOL * ref_maps.abs()
    diff = (torch.as_tensor(maps) - ref_maps).abs()
    assert bool((diff <= bound).all()), f"z-score map off by {float((diff - bound).max()):.3g} over the bound"
    worst = bound.flatten(1).amax(1)
    assert bool(((torch.as_tensor(scores) - ref_scores).abs() <= worst).all()), "z-score score"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", ["none", "zscore"])
def test_detector_scores_through_the_engine_like_compute_maps(trained, normalize, backend):
    det = detector(trained, normalize, backend)
    x = images(5, 1)
    ref_maps, ref_scores = eager(det, x, batch_size=2)
    assert float(ref_scores.abs().min()) > 0  # a non-trivial map
    _, maps, scores = det.anomaly_maps(x, batch_size=2)
    engine = det._cpu_engine()
    assert engine is not None and engine.backend == backend and engine.threads == 1
    assert maps.shape == (5, 1, *SIZE) and maps.dtype == torch.float32 and scores.dtype == torch.float32
    check_parity(det, x, maps, scores, ref_maps, ref_scores)
    # predict: the same maps, the detector's thresholds (none are in the engine)
    res = det.predict(x.permute(0, 2, 3, 1).numpy())
    check_parity(det, x, res.anomaly_map[:, None], res.pred_score, ref_maps, ref_scores)
    assert engine.thresholds == {"image": None, "pixel": None}
    np.testing.assert_array_equal(res.pred_label, res.pred_score > det.thresholds["image"])
    np.testing.assert_array_equal(res.pred_mask, res.anomaly_map > det.thresholds["pixel"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_members_score_through_the_engine_like_compute_maps(backend):
    """``model.members`` = 2 with the residual head (the engine switches every member's ``x + h`` off and adds x
    itself): the engine's maps and scores are the eager ones of the averaged reconstruction."""
    cfg = tiny_config()
    cfg.model.members, cfg.model.residual = 2, True
    det = Detector(cfg, device="cpu", engine_backend=backend, threads=1).fit(images(12, 0), progress=False)
    assert type(det.model).__name__ == "Members"
    x = images(5, 1)
    ref_maps, ref_scores = eager(det, x, batch_size=2)
    assert float(ref_scores.abs().min()) > 0
    _, maps, scores = det.anomaly_maps(x, batch_size=2)
    assert det._cpu_engine().backend == backend
    check_parity(det, x, maps, scores, ref_maps, ref_scores)


def test_batches_are_split_by_batch_size(trained, monkeypatch):
    det = detector(trained, "zscore", "torch")
    engine = det._cpu_engine()
    sizes, real = [], engine.run
    monkeypatch.setattr(engine, "run", lambda x: sizes.append(x.shape[0]) or real(x))
    x = images(5, 2)
    _, maps, _ = det.anomaly_maps(x, batch_size=2)
    assert sizes == [2, 2, 1]
    sizes.clear()
    _, whole, _ = det.anomaly_maps(x)  # batch_size 32: one call
    assert sizes == [5]
    assert_close(maps, whole, atol=ATOL, rtol=RTOL, msg="map of split vs whole batch")
    fresh = detector(trained, "zscore", "torch")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        fresh.predict(x, batch_size=0)
    assert fresh._engine is None  # refused before anything was built


@pytest.mark.skipif(not ort.available(), reason="needs onnxruntime and onnxscript")
def test_engine_and_export_are_cached_and_rebuilt_only_when_needed(trained, monkeypatch):
    from fae_fast.inference import export

    exports, real = [], export.export_onnx
    monkeypatch.setattr(export, "export_onnx", lambda *a, **kw: exports.append(kw["input_dtype"]) or real(*a, **kw))
    det = detector(trained, "zscore", "onnxruntime")
    det.model = copy.deepcopy(trained.model)
    nudge(det.model, 0)  # weights no other test exported
    x = images(3, 3)
    first = det.predict(x)
    engine = det._cpu_engine()
    det.predict(x, image_threshold=0.5, pixel_threshold=0.5)
    det.set_thresholds(image=1.0, pixel=2.0)
    det.predict(x)
    assert exports == ["uint8"] and det._cpu_engine() is engine  # thresholds never rebuild
    nudge(det.model, 1)  # an in-place change of the weights (an optimizer step, load_state_dict)
    changed = det.predict(x)
    assert det._cpu_engine() is not engine and len(exports) == 2
    assert not torch.equal(changed.pred_score, first.pred_score)
    check_parity(det, x, changed.anomaly_map[:, None], changed.pred_score, *eager(det, x))
    engine = det._cpu_engine()
    det.threads = 2  # a new session, the exported bytes reused
    assert det._cpu_engine() is not engine and len(exports) == 2
    assert det._cpu_engine().threads == 2
    engine = det._cpu_engine()
    det.model = copy.deepcopy(det.model)  # another object, the same weights: rebuilt, not re-exported
    assert det._cpu_engine() is not engine and len(exports) == 2
    det.fit(images(8, 4), steps=1, progress=False)
    assert det._engine is None  # fit drops the engine of the old model
    det.predict(x)
    assert det._engine is not None and det._engine[1][0][0] is det.model and len(exports) == 3


def test_cuda_and_autocast_keep_the_eager_path(trained):
    on_cuda = Detector(tiny_config(), device="cuda")  # constructed only: nothing runs on the device
    on_cuda.model = trained.model
    assert on_cuda._cpu_engine() is None
    with pytest.raises(ValueError, match="engine_backend='onnxruntime' scores on the CPU"):
        Detector(tiny_config(), device="cuda", engine_backend="onnxruntime")
    det = detector(trained, "none", "auto")
    det.config.train.amp = "bf16"
    assert det._cpu_engine() is None  # the eager bf16 autocast path, as before
    det.engine_backend = "onnxruntime"
    with pytest.raises(ValueError, match="scores in fp32, config.train.amp is 'bf16'"):
        det.predict(images(1, 5))


@pytest.mark.parametrize("kwargs, match", [(dict(engine_backend="openvino"), "engine_backend must be one of"),
                                           (dict(threads=0), "threads must be a positive int"),
                                           (dict(threads=True), "threads must be a positive int")])
def test_bad_engine_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Detector(tiny_config(), device="cpu", **kwargs)


def test_backend_names_match_the_engine():
    from fae_fast.inference.engine import BACKENDS as ENGINE

    assert ENGINE_BACKENDS == ENGINE


def test_load_passes_the_engine_settings_and_copies_drop_the_engine(trained, tmp_path):
    trained.save(tmp_path / "m.fae")
    det = Detector.load(tmp_path / "m.fae", device="cpu", engine_backend="torch", threads=1)
    assert det.engine_backend == "torch" and det.threads == 1 and "engine_backend='torch'" in repr(det)
    x = images(2, 6)
    res = det.predict(x)
    assert det._engine is not None
    for twin in (copy.deepcopy(det), pickle.loads(pickle.dumps(det))):
        assert twin._engine is None
        assert torch.equal(twin.predict(x).pred_score, res.pred_score)


# ------------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def model_and_data(trained, tmp_path_factory):
    from fae_fast.synthetic import make_dataset

    root = tmp_path_factory.mktemp("cli")
    trained.save(root / "m.fae")
    data = make_dataset(root / "d", n_train=2, n_test_good=2, n_test_defect=1, size=SIZE, seed=1)
    return root / "m.fae", data


@pytest.fixture
def loads(monkeypatch):
    """Every Detector.load of the CLI: (its keyword arguments, the detector)."""
    seen, real = [], Detector.load.__func__

    def spy(cls, path, **kw):
        det = real(cls, path, **kw)
        seen.append((kw, det))
        return det

    monkeypatch.setattr(Detector, "load", classmethod(spy))
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_predict_and_eval_pass_engine_backend_and_threads(model_and_data, loads, tmp_path, backend):
    model, data = model_and_data
    good = str(data / "test" / "good")
    assert main(["predict", "--model", str(model), good, "--out", str(tmp_path / "p"), "--device", "cpu",
                 "--engine-backend", backend, "--threads", "1"]) == 0
    assert main(["eval", "--model", str(model), "--data", str(data), "--json", str(tmp_path / "e.json"),
                 "--device", "cpu", "--engine-backend", backend, "--threads", "1"]) == 0
    assert main(["calibrate", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "c.fae"),
                 "--device", "cpu", "--engine-backend", backend, "--threads", "1"]) == 0
    assert [kw for kw, _ in loads] == [dict(device="cpu", engine_backend=backend, threads=1)] * 3
    for _, det in loads:
        engine = det._cpu_engine()
        assert engine.backend == backend and engine.threads == 1
        if backend == "onnxruntime":
            assert engine._ort.session("uint8").get_session_options().intra_op_num_threads == 1
    # the scores written are the eager ones within the fp32 bound (z-scores of size ~1: rtol plus a 1e-5 floor)
    from fae_fast.data import load_images

    rows = json.loads((tmp_path / "p" / "results.json").read_text())["results"]
    got = {Path(r["file"]).name: r["score"] for r in rows}
    paths = sorted((data / "test" / "good").iterdir())
    _, ref_scores = eager(loads[0][1], load_images(paths, SIZE))
    assert sorted(got) == [p.name for p in paths]
    for p, ref in zip(paths, ref_scores.tolist()):
        assert abs(got[p.name] - ref) <= RTOL * abs(ref) + 1e-5, (p.name, got[p.name], ref)


def test_cli_refuses_an_unknown_or_missing_engine_backend(model_and_data, tmp_path, capsys, monkeypatch):
    model, data = model_and_data
    args = ["predict", "--model", str(model), str(data / "test" / "good"), "--out", str(tmp_path / "p"),
            "--device", "cpu", "--engine-backend"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "openvino"])
    assert exc.value.code == 2 and "invalid choice: 'openvino'" in capsys.readouterr().err
    monkeypatch.setattr(ort, "missing", lambda: ["onnxruntime"])
    assert main([*args, "onnxruntime"]) == 2
    assert "needs onnxruntime" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()  # refused before any output was written

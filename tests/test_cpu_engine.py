"""The Engine's CPU backend (ONNX Runtime on the exported scoring graph) against the PyTorch engine and the oracle.

Tolerance: ``rtol=1e-5, atol=1e-8`` on maps and scores, ten times tighter than the engine's documented fp32
bound (``rtol=1e-4, atol=1e-7``, module doc of :mod:`fae_fast.inference.engine`): ONNX Runtime's convolutions
(MLAS, NCHWc) sum in another order than PyTorch's; measured on these maps (2-core AMD EPYC, onnxruntime 1.32):
ONNX Runtime vs the PyTorch engine 8.1e-7 relative (map) / 2.3e-7 (score), vs the eager oracle 3.4e-7 / 1.5e-7.
Small images and the 8-16 U-Net keep every test within seconds on 2 cores.
"""
import copy
import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from fae_fast.checkpoint import save_model_file
from fae_fast.config import FAEConfig
from fae_fast.inference import Engine, InlineStream, ort
from tests.helpers import assert_close
from tests.test_engine import K_SMOOTH, N_SMOOTH, H, W, eager_reference, frames, tiny_model

pytestmark = pytest.mark.skipif(not ort.available(), reason="needs onnxruntime and onnxscript")
TOL = dict(atol=1e-8, rtol=1e-5)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ort_engine(model):
    return Engine(model, image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu", backend="onnxruntime",
                  threads=1, thresholds={"image": 1e-3, "pixel": 5e-4})


@pytest.fixture(scope="module")
def torch_engine(model):
    return Engine(model, image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu", backend="torch",
                  thresholds={"image": 1e-3, "pixel": 5e-4})


def test_auto_picks_onnxruntime_on_the_cpu(model):
    eng = Engine(model, image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu")
    assert eng.backend == "onnxruntime" and "backend='onnxruntime'" in repr(eng)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["uint8", "float32", "float16"])
def test_onnxruntime_matches_torch_engine_and_eager(model, ort_engine, torch_engine, kind, batch):
    x = frames(batch, seed=batch)
    inp = {"uint8": x, "float32": x.float() / 255, "float16": (x.float() / 255).half()}[kind]
    got = ort_engine.predict(inp)
    ref = torch_engine.predict(inp)
    ref_map, ref_score = eager_reference(model, inp)
    assert got.anomaly_map.shape == (batch, H, W) and got.anomaly_map.dtype == torch.float32
    assert float(ref_score.min()) > 0  # a non-trivial map
    assert_close(got.anomaly_map, ref.anomaly_map, **TOL, msg="map vs torch engine")
    assert_close(got.pred_score, ref.pred_score, **TOL, msg="score vs torch engine")
    assert_close(got.anomaly_map, ref_map, **TOL, msg="map vs eager")
    assert_close(got.pred_score, ref_score, **TOL, msg="score vs eager")
    # thresholds are applied after the graph, exactly as on the PyTorch path
    assert torch.equal(got.pred_label, got.pred_score > 1e-3)
    assert torch.equal(got.pred_mask, got.anomaly_map > 5e-4)


def test_channels_last_view_and_numpy_camera_frames(ort_engine, torch_engine):
    """The InlineStream hands the engine NHWC views (non-contiguous NCHW); numpy frames come back as numpy."""
    x = frames(2, seed=5)
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    m, s = ort_engine.run(nhwc.permute(0, 3, 1, 2))
    m_ref, s_ref = ort_engine.run(x)
    assert torch.equal(m, m_ref) and torch.equal(s, s_ref)
    res = ort_engine.predict(nhwc.numpy())
    assert isinstance(res.pred_score, np.ndarray)
    assert_close(torch.from_numpy(res.pred_score), torch_engine.predict(x).pred_score, **TOL, msg="score")


def test_inline_stream_on_the_onnxruntime_engine(ort_engine):
    x = frames(5, seed=7)
    ref = ort_engine.predict(x)
    with InlineStream(ort_engine, max_batch=2, max_delay_ms=0) as stream:
        stream.submit_many([np.ascontiguousarray(f.permute(1, 2, 0).numpy()) for f in x])
    got = sorted(stream, key=lambda r: r.index)
    assert [r.index for r in got] == list(range(5))
    for r in got:
        assert r.pred_score == pytest.approx(float(ref.pred_score[r.index]), rel=1e-6)


def test_export_is_cached_per_model_and_shape(monkeypatch):
    from fae_fast.inference import export

    calls = []
    real = export.export_onnx

    def counting(*a, **kw):
        calls.append(kw.get("image_size"))
        return real(*a, **kw)

    monkeypatch.setattr(export, "export_onnx", counting)
    net = tiny_model(seed=11)  # fresh weights (build_model's init is random): not in the cache yet
    Engine(net, image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu", backend="onnxruntime")
    Engine(copy.deepcopy(net), image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu", backend="onnxruntime",
           threads=1)  # the same weights (another object) and other session options: no new export
    assert len(calls) == 1
    Engine(tiny_model(seed=12), image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu", backend="onnxruntime")
    assert len(calls) == 2  # other weights
    Engine(net, image_size=(H + 2, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu", backend="onnxruntime")
    assert len(calls) == 3  # another image size


def test_fingerprint_sees_weights_and_attributes():
    a = tiny_model(seed=3)
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    assert ort.model_fingerprint(a) == ort.model_fingerprint(b) == ort.model_fingerprint(c)
    b.residual = not b.residual  # changes the forward, not the weights
    assert ort.model_fingerprint(a) != ort.model_fingerprint(b)
    with torch.no_grad():
        next(c.parameters()).view(-1)[0] += 1e-3
    assert ort.model_fingerprint(a) != ort.model_fingerprint(c)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_inpainted_cells_reach_the_engine(backend):
    """A model with ``hide_cell`` scores its four hidden-cell passes on either backend, as eager does."""
    plain = tiny_model(seed=2).eval()
    model = copy.deepcopy(plain)
    model.hide_cell = 4
    x = frames(2, seed=5)
    ref_map, ref_score = eager_reference(model, x)
    assert not torch.allclose(ref_map, eager_reference(plain, x)[0], atol=1e-4)
    got = Engine(model, image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu", backend=backend, threads=1).predict(x)
    assert_close(got.anomaly_map, ref_map, **TOL, msg="map vs eager")
    assert_close(got.pred_score, ref_score, **TOL, msg="score vs eager")


def test_threads_reach_the_session(ort_engine):
    assert ort_engine.threads == 1
    assert ort_engine._ort.session("uint8").get_session_options().intra_op_num_threads == 1
    with pytest.raises(ValueError, match="threads"):
        Engine(tiny_model(), image_size=(H, W), device="cpu", threads=0)


@pytest.mark.parametrize("kwargs", [dict(dtype="bf16"), dict(compile=True), dict(map_backend="torch")])
def test_torch_settings_keep_the_torch_backend(model, kwargs):
    kw = dict(image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu")
    if "compile" not in kwargs:  # construction only: no torch.compile run here
        assert Engine(model, **kw, **kwargs).backend == "torch"
    with pytest.raises(ValueError, match="backend='onnxruntime'"):
        Engine(model, **kw, **kwargs, backend="onnxruntime")


def test_cuda_never_uses_onnxruntime():
    """The GPU path stays the PyTorch engine (checked on the resolver: this machine may have no GPU)."""
    stub = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
    assert Engine._resolve_backend(stub, "auto", None, "auto") == "torch"
    with pytest.raises(ValueError, match="backend='onnxruntime' runs fp32 on the CPU"):
        Engine._resolve_backend(stub, "onnxruntime", None, "auto")


def test_bad_backend_name(model):
    with pytest.raises(ValueError, match="backend must be one of"):
        Engine(model, image_size=(H, W), device="cpu", backend="openvino")


def test_missing_onnxruntime_falls_back_with_one_warning(model, monkeypatch):
    from fae_fast.inference import engine as engine_mod

    monkeypatch.setattr(ort, "missing", lambda: ["onnxruntime"])
    monkeypatch.setattr(engine_mod, "_warned", set())
    with pytest.warns(RuntimeWarning, match="onnxruntime not installed"):
        eng = Engine(model, image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu")
    assert eng.backend == "torch" and eng._ort is None
    with pytest.raises(ValueError, match="needs onnxruntime"):
        Engine(model, image_size=(H, W), device="cpu", backend="onnxruntime")


class NotExportable(nn.Module):
    """A network whose forward branches on a value (torch.export cannot trace it)."""

    def __init__(self):
        super().__init__()
        self.net = tiny_model()

    def forward(self, x):
        return self.net(x) if float(x.mean()) > -1 else x


def test_unexportable_model_falls_back_to_torch(monkeypatch):
    from fae_fast.inference import engine as engine_mod

    monkeypatch.setattr(engine_mod, "_warned", set())
    net = NotExportable().eval()
    with pytest.warns(RuntimeWarning, match="exporting NotExportable to ONNX"):
        eng = Engine(net, image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu", fold_bn=False)
    assert eng.backend == "torch"
    x = frames(2)
    assert_close(eng.predict(x).pred_score, eager_reference(net, x)[1], **TOL, msg="score")
    with pytest.raises(RuntimeError, match="backend='onnxruntime': exporting NotExportable"):
        Engine(net, image_size=(H, W), device="cpu", fold_bn=False, backend="onnxruntime")


def test_model_file_thresholds_apply(tmp_path, model):
    cfg = FAEConfig()
    cfg.model.widths, cfg.model.dilations = (8, 16), (1, 2)
    cfg.map.normalize = "none"  # raw maps (a normalising model file carries its statistics: test_recipe.py)
    path = save_model_file(tmp_path / "m.pt", model_state=model.state_dict(), config=cfg, image_size=(H, W),
                           thresholds={"image": 2e-3, "pixel": 1e-3})
    eng = Engine.from_model_file(path, device="cpu", n=N_SMOOTH, k=K_SMOOTH)
    assert eng.backend == "onnxruntime" and eng.thresholds == {"image": 2e-3, "pixel": 1e-3}
    res = eng.predict(frames(3))
    assert res.image_threshold == 2e-3 and torch.equal(res.pred_label, res.pred_score > 2e-3)
    assert torch.equal(res.pred_mask, res.anomaly_map > 1e-3)


def test_warmup_builds_the_float_session(model):
    eng = Engine(model, image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu")
    eng.warmup((torch.uint8, torch.float32))
    assert set(eng._ort._sessions) == {"uint8", "float32"}


def test_bench_cpu_reports_all_providers_side_by_side(tmp_path):
    from fae_fast.inference import bench

    out = tmp_path / "b.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert bench.main(["--quick", "--device", "cpu", "--threads", "1", "--scenarios", "host_latency",
                           "--latency-reps", "2", "--json", str(out), "--note", "ci"]) == 0
    rep = json.loads(out.read_text())
    provs = {r["provider"] for r in rep["rows"]}
    assert {"eager_fp32", "engine_torch", "engine", "onnxruntime"} <= provs
    assert rep["engine_backend"] == "onnxruntime" and rep["threads"] == 1 and rep["note"] == "ci"
    assert rep["onnxruntime"] and "git_commit" in rep and "load_avg_start" in rep
    ratio = rep["ratios"]["host_latency"]["1"]
    assert ratio["engine_vs_onnxruntime"] > 0 and ratio["engine_vs_eager_fp32"] > 0
    assert rep["max_rel_score_diff"]["engine"] < 1e-4 and rep["max_rel_score_diff"]["onnxruntime"] < 1e-4

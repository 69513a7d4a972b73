"""Exports of the reference graph vs the eager fp32 model: ONNX (onnxruntime), torch.export, AOTInductor.

Scores agree within 1e-3 (relative; in practice ~1e-6). ONNX tests skip without onnx/onnxruntime/onnxscript
(test dependencies: ``pip install onnx onnxruntime onnxscript``); the CPU AOTInductor compile takes ~40 s and is
marked ``slow``.
"""
import json

import numpy as np
import pytest
import torch

from fae_fast.inference.export import ReferenceGraph, export_aoti, export_onnx, load_aoti
from tests.helpers import assert_close
from tests.test_engine import K_SMOOTH, N_SMOOTH, H, W, eager_reference, frames, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4)


@pytest.mark.parametrize("error", ["squared", "gradient"])
def test_reference_graph_matches_eager(model, error):
    g = ReferenceGraph(model, n=N_SMOOTH, k=K_SMOOTH, error=error)
    x = frames(3, seed=31)
    with torch.no_grad():
        m, s = g(x)
        mf, sf = g(x.float() / 255)
    ref_map, ref_score = eager_reference(model, x, error=error)
    assert m.shape == (3, 1, H, W) and s.shape == (3,)
    assert_close(m[:, 0], ref_map, atol=1e-8, rtol=1e-4)
    assert_close(s, ref_score, atol=1e-8, rtol=1e-4)
    assert_close(sf, s, atol=1e-9, rtol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        ReferenceGraph(model, n=2, k=4)


def test_torch_export_dynamic_batch(model):
    g = ReferenceGraph(model, n=N_SMOOTH, k=K_SMOOTH)
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        ep = torch.export.export(g, (frames(2),), dynamic_shapes={"x": {0: batch}})
        for b in (1, 5):
            x = frames(b, seed=33 + b)
            m, s = ep.module()(x)
            ref_map, ref_score = eager_reference(model, x)
            assert_close(s, ref_score, atol=1e-8, rtol=1e-3)
            assert_close(m[:, 0], ref_map, atol=1e-8, rtol=1e-3)


@pytest.mark.parametrize("input_dtype", ["uint8", "float32"])
def test_onnx_matches_eager(tmp_path, model, input_dtype):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(model, tmp_path / "fae.onnx", image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH,
                       thresholds={"image": 0.1, "pixel": 0.2}, input_dtype=input_dtype)
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["image_size"]) == [H, W] and meta["n"] == str(N_SMOOTH)
    assert meta["error"] == "squared+gradient"  # the default map's error kind, recorded with the graph
    assert json.loads(meta["image_threshold"]) == 0.1 and json.loads(meta["pixel_threshold"]) == 0.2
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert "AveragePool" in {n.op_type for n in proto.graph.node}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images"]
    assert [o.name for o in sess.get_outputs()] == ["anomaly_map", "pred_score"]
    for b in (1, 3):  # dynamic batch
        x = frames(b, seed=40 + b)
        inp = x.numpy() if input_dtype == "uint8" else (x.float() / 255).numpy()
        amap, score = sess.run(None, {"images": inp})
        ref_map, ref_score = eager_reference(model, x)
        assert amap.shape == (b, 1, H, W) and score.shape == (b,)
        assert_close(torch.from_numpy(score), ref_score, atol=1e-8, rtol=1e-3)
        assert_close(torch.from_numpy(amap[:, 0]), ref_map, atol=1e-8, rtol=1e-3)
        # thresholds are applied outside the graph: any value, no re-export
        assert np.array_equal(amap[:, 0] > 1e-3, ref_map.numpy() > 1e-3) or \
            np.mean((amap[:, 0] > 1e-3) != (ref_map.numpy() > 1e-3)) < 1e-3


def test_onnx_export_quiet(tmp_path, model, capfd):
    """verbose=False (what the CPU engine passes when it exports as a side effect): no exporter progress lines."""
    pytest.importorskip("onnxscript")
    export_onnx(model, tmp_path / "q.onnx", image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, verbose=False)
    assert "[torch.onnx]" not in capfd.readouterr().out


def test_export_validation(tmp_path, model):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "a.onnx", image_size=(H, W), opset=16)
    with pytest.raises(ValueError, match="input_dtype"):
        export_onnx(model, tmp_path / "a.onnx", image_size=(H, W), input_dtype="int16")
    with pytest.raises(ValueError, match="not a file"):
        load_aoti(tmp_path / "missing.pt2")


@pytest.mark.slow
def test_aoti_package_matches_eager(tmp_path, model):
    """AOTInductor on the CPU (~40 s of C++ compilation on 2 cores: the only AOTI test on the CPU)."""
    path = export_aoti(model, tmp_path / "fae.pt2", image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, max_batch=16,
                       thresholds={"image": 0.1})
    meta = json.loads((tmp_path / "fae.pt2.json").read_text())
    assert meta["device"] == "cpu" and json.loads(meta["image_threshold"]) == 0.1
    run = load_aoti(path)
    for b in (1, 4):
        x = frames(b, seed=50 + b)
        m, s = run(x)
        ref_map, ref_score = eager_reference(model, x)
        assert_close(s, ref_score, atol=1e-8, rtol=1e-3)
        assert_close(m[:, 0], ref_map, atol=1e-8, rtol=1e-3)


@pytest.mark.gpu
def test_aoti_package_cuda(tmp_path, model):
    path = export_aoti(model, tmp_path / "fae_cuda.pt2", image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH,
                       device="cuda", max_batch=64)
    run = load_aoti(path)
    x = frames(7, seed=61).cuda()
    m, s = run(x)
    ref_map, ref_score = eager_reference(model, x)
    assert_close(s, ref_score, atol=1e-8, rtol=1e-3)
    assert_close(m[:, 0], ref_map, atol=1e-8, rtol=1e-3)

"""``fae-fast export --triton-repo``: the Triton model repository (ONNX graph + config.pbtxt) of a model file.

Needs no PyTriton (onnx, onnxruntime, onnxscript): runs in the main suite and in the serving environment. The
config is parsed twice where possible: by a small protobuf text-format parser here, and, where tritonclient is
installed (the serving environment), by protobuf against Triton's own ModelConfig schema. The ONNX file is run
with ONNX Runtime and compared to :meth:`Engine.predict` on the same frames (the same graph: bitwise equal
in practice; the bound is the engine's CPU tolerance).
"""
from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest

from fae_fast.checkpoint import save_model_file
from fae_fast.cli import main
from fae_fast.config import FAEConfig
from fae_fast.inference import Engine, ort
from tests.helpers import assert_close
from tests.test_engine import H, W, frames, tiny_model

pytestmark = pytest.mark.skipif(not ort.available() or importlib.util.find_spec("onnx") is None,
                                reason="needs onnx, onnxruntime and onnxscript")
TH = {"image": 2e-3, "pixel": 1.8e-3}
TRITON_TYPES = {"TYPE_UINT8": np.uint8, "TYPE_FP32": np.float32}


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format -> nested dicts; every field is a list of its values (repeated or not)."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+', re.sub(r"#[^\n]*", "", text))
    pos = 0

    def value():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "{":
            return message("}")
        if tok == "[":
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        if tok.startswith('"'):
            return json.loads(tok)
        return int(tok) if re.fullmatch(r"-?\d+", tok) else tok

    def message(end):
        nonlocal pos
        out: dict = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            v = value()
            for item in (v if isinstance(v, list) and key in ("input", "output") else [v]):
                out.setdefault(key, []).append(item)
            if pos < len(tokens) and tokens[pos] == ",":
                pos += 1
        pos += 1
        return out

    return message(None)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    cfg = FAEConfig()
    cfg.model.widths, cfg.model.dilations = (8, 16), (1, 2)
    cfg.map.normalize = "none"
    path = tmp_path_factory.mktemp("repo") / "m.fae"
    return save_model_file(path, model_state=tiny_model(seed=7).state_dict(), config=cfg, image_size=(H, W),
                           thresholds=TH)


@pytest.fixture(scope="module")
def repo(model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "models"
    rc = main(["export", "--model", str(model_file), "--triton-repo", str(out), "--name", "fae_line1",
               "--max-batch", "8", "--max-queue-delay-us", "250", "--max-queue-size", "32"])
    assert rc == 0
    return out


def test_layout_and_config_match_the_onnx_graph(repo):
    import onnx

    folder = repo / "fae_line1"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == \
        ["1/model.onnx", "config.pbtxt"]
    cfg = parse_pbtxt((folder / "config.pbtxt").read_text())
    m = onnx.load(str(folder / "1" / "model.onnx"))
    assert cfg["name"] == ["fae_line1"] and cfg["backend"] == ["onnxruntime"] and cfg["max_batch_size"] == [8]
    batcher = cfg["dynamic_batching"][0]
    assert batcher["max_queue_delay_microseconds"] == [250]
    assert batcher["default_queue_policy"][0]["max_queue_size"] == [32]
    onnx_types = {1: "TYPE_FP32", 2: "TYPE_UINT8"}
    for kind, values in (("input", m.graph.input), ("output", m.graph.output)):
        declared = {t["name"][0]: t for t in cfg[kind]}
        assert set(declared) == {v.name for v in values}, kind
        for v in values:
            t = declared[v.name]
            shape = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            assert shape[0] is None, f"{v.name}: the batch dimension must be dynamic"
            assert t["data_type"] == [onnx_types[v.type.tensor_type.elem_type]]
            if shape[1:]:
                assert t["dims"] == [shape[1:]] and "reshape" not in t
            else:  # (B,): one value per sample
                assert t["dims"] == [[1]] and t["reshape"] == [{"shape": [[]]}]
    assert set(cfg["input"][0]["name"]) == {"images"} and cfg["input"][0]["dims"] == [[3, H, W]]
    params = {p["key"][0]: p["value"][0]["string_value"][0] for p in cfg["parameters"]}
    props = {p.key: p.value for p in m.metadata_props}
    assert params == props  # the same metadata in the config and in the ONNX file
    assert json.loads(params["image_threshold"]) == TH["image"] and json.loads(params["pixel_threshold"]) == TH["pixel"]
    assert json.loads(params["image_size"]) == [H, W] and params["map_normalize"] == "none"
    assert params["input_scaling"].startswith("uint8 images / 255") and params["fae_fast_version"]


def test_tensorrt_config_asks_for_gpu_instances_with_the_tensorrt_accelerator(model_file, tmp_path):
    assert main(["export", "--model", str(model_file), "--triton-repo", str(tmp_path / "r"), "--tensorrt"]) == 0
    text = (tmp_path / "r" / "fae" / "config.pbtxt").read_text()
    cfg = parse_pbtxt(text)
    assert cfg["instance_group"] == [[{"kind": ["KIND_GPU"]}]] and cfg["backend"] == ["onnxruntime"]
    acc = cfg["optimization"][0]["execution_accelerators"][0]["gpu_execution_accelerator"][0][0]
    assert acc["name"] == ["tensorrt"]
    assert {p["key"][0]: p["value"][0] for p in acc["parameters"]}["precision_mode"] == "FP16"
    if importlib.util.find_spec("tritonclient") is not None:  # Triton's own schema, in the serve environment
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        parsed = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert parsed.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="tritonclient (Triton's schema) absent")
def test_config_parses_with_tritons_own_schema(repo):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse((repo / "fae_line1" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.max_batch_size == 8 and cfg.dynamic_batching.default_queue_policy.max_queue_size == 32
    assert [o.name for o in cfg.output] == ["anomaly_map", "pred_score"]
    assert cfg.parameters["image_threshold"].string_value == json.dumps(TH["image"])


def test_onnx_in_the_repo_equals_engine_predict(repo, model_file):
    import onnxruntime

    cfg = parse_pbtxt((repo / "fae_line1" / "config.pbtxt").read_text())
    params = {p["key"][0]: p["value"][0]["string_value"][0] for p in cfg["parameters"]}
    it, pt = json.loads(params["image_threshold"]), json.loads(params["pixel_threshold"])
    sess = onnxruntime.InferenceSession(str(repo / "fae_line1" / "1" / "model.onnx"),
                                        providers=["CPUExecutionProvider"])
    eng = Engine.from_model_file(model_file, device="cpu")
    for b in (1, 5):
        x = frames(b, seed=40 + b)
        amap, score = sess.run(["anomaly_map", "pred_score"], {"images": x.numpy()})
        ref = eng.predict(x)
        assert amap.shape == (b, 1, H, W) and score.shape == (b,)
        assert_close(score, ref.pred_score, atol=1e-8, rtol=1e-5, msg="score")
        assert_close(amap[:, 0], ref.anomaly_map, atol=1e-8, rtol=1e-5, msg="map")
        assert np.array_equal(~(score <= it), ref.pred_label.numpy())  # the documented client-side labelling
        assert np.array_equal(~(amap[:, 0] <= pt), ref.pred_mask.numpy())


def test_export_refuses_bad_arguments_in_one_line(model_file, tmp_path, capsys):
    assert main(["export", "--model", str(model_file), "--triton-repo", str(tmp_path), "--name", "a/b"]) == 2
    assert "name must be letters" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "none.fae"), "--triton-repo", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["export", "--model", str(model_file), "--triton-repo", str(tmp_path / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err

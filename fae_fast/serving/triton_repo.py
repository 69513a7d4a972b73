"""``fae-fast export --triton-repo DIR``: a Triton model repository for plants that run their own Triton servers.

Layout (Triton's model repository)::

    DIR/<name>/config.pbtxt        backend onnxruntime, dynamic batching, inputs/outputs of the ONNX graph,
                                   fae_fast's metadata as `parameters`
    DIR/<name>/1/model.onnx        the scoring graph the CPU engine runs (network + error map + box filters + max,
                                   ``x / 255`` of the uint8 input and the model file's map normalisation inside)

The graph is :mod:`fae_fast.inference.export`'s: input ``images`` uint8 (B, C, H, W), outputs ``anomaly_map``
float32 (B, 1, H, W) and ``pred_score`` float32 (B,); thresholds are not in the graph (so that they change without
a re-export): a client labels ``pred_score > image_threshold`` and masks ``anomaly_map > pixel_threshold`` (NaN
counting as above), with the model file's thresholds found in the config's ``parameters``. The config's tensor
names, types and dims are read from the ONNX graph itself, never typed twice. With ``tensorrt=True`` the config
asks for GPU instances with ONNX Runtime's TensorRT accelerator (FP16 engines built by Triton on first load; not
run or measured here: no GPU and no tritonserver in CI).

Every file is written atomically (:mod:`fae_fast._atomic`): a failed export leaves the previous files intact.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .._atomic import write_bytes, write_text

__all__ = ["export_triton_repo", "config_pbtxt", "ONNX_TO_TRITON"]

# onnx.TensorProto element types -> Triton data types
ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 5: "TYPE_INT16", 6: "TYPE_INT32", 7: "TYPE_INT64",
                  9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _dims(value_info) -> tuple[bool, list[int]]:
    """(batch dimension is dynamic, the other dims) of an ONNX graph input/output."""
    dims = value_info.type.tensor_type.shape.dim
    if not dims:
        raise ValueError(f"ONNX tensor {value_info.name!r} has no batch dimension")
    rest = []
    for d in dims[1:]:
        if not d.HasField("dim_value"):
            raise ValueError(f"ONNX tensor {value_info.name!r} has a dynamic non-batch dimension ({d.dim_param!r})")
        rest.append(int(d.dim_value))
    return not dims[0].HasField("dim_value"), rest


def _quote(s: str) -> str:
    return json.dumps(str(s))  # a JSON string is a valid protobuf text-format string


def config_pbtxt(model, *, name: str, max_batch: int, max_queue_delay_us: int, max_queue_size: int,
                 parameters: dict[str, str], tensorrt: bool = False) -> str:
    """The ``config.pbtxt`` of an ONNX model (an ``onnx.ModelProto``) with a dynamic batch dimension.

    Outputs with only the batch dimension (``pred_score`` (B,)) are declared ``dims: [ 1 ]`` with
    ``reshape: { shape: [ ] }``, Triton's convention for a per-sample scalar. ``tensorrt``: GPU instances whose
    ONNX Runtime runs the graph through TensorRT (FP16).
    """
    def tensors(values, kind):
        out = []
        for v in values:
            dyn, dims = _dims(v)
            if not dyn:
                raise ValueError(f"ONNX {kind} {v.name!r}: the batch dimension is fixed; export with a dynamic batch")
            elem = v.type.tensor_type.elem_type
            if elem not in ONNX_TO_TRITON:
                raise ValueError(f"ONNX {kind} {v.name!r} has element type {elem}, which Triton does not take")
            shape = f"dims: [ {', '.join(map(str, dims))} ]" if dims else "dims: [ 1 ]\n    reshape: { shape: [ ] }"
            out.append(f"  {{\n    name: {_quote(v.name)}\n    data_type: {ONNX_TO_TRITON[elem]}\n    {shape}\n  }}")
        return ",\n".join(out)

    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [v for v in model.graph.input if v.name not in initializers]
    params = "\n".join(f"parameters {{\n  key: {_quote(k)}\n  value: {{ string_value: {_quote(v)} }}\n}}"
                       for k, v in parameters.items())
    return (f"# written by fae-fast export --triton-repo: the ONNX scoring graph of a fae_fast model file\n"
            f"name: {_quote(name)}\n"
            f"backend: \"onnxruntime\"\n"
            f"max_batch_size: {int(max_batch)}\n"
            f"input [\n{tensors(graph_inputs, 'input')}\n]\n"
            f"output [\n{tensors(model.graph.output, 'output')}\n]\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {int(max_queue_delay_us)}\n"
            f"  default_queue_policy {{ max_queue_size: {int(max_queue_size)} }}\n}}\n"
            + (_TENSORRT if tensorrt else "")
            + f"{params}\n")


# ONNX Runtime's TensorRT execution provider inside Triton's onnxruntime backend, on the GPU
_TENSORRT = ("instance_group [ { kind: KIND_GPU } ]\n"
             "optimization { execution_accelerators { gpu_execution_accelerator: [ {\n"
             "  name: \"tensorrt\"\n"
             "  parameters { key: \"precision_mode\" value: \"FP16\" }\n"
             "  parameters { key: \"max_workspace_size_bytes\" value: \"1073741824\" }\n"
             "} ] } }\n")


def export_triton_repo(model_file, repo, *, name: str = "fae", max_batch: int = 16, max_queue_delay_us: int = 500,
                       max_queue_size: int = 64, tensorrt: bool = False) -> Path:
    """Write a Triton model repository entry for a fae_fast model file.

    Args:
        model_file: a model file written by ``fae-fast train`` / :meth:`fae_fast.api.Detector.save`.
        repo: the repository folder (created if needed); the model goes to ``repo/<name>/``.
        name: the Triton model name (letters, digits, ``_ . -``).
        max_batch: ``max_batch_size``: the largest batch Triton's dynamic batcher forms.
        max_queue_delay_us: how long Triton may hold a request to batch it with later ones.
        max_queue_size: requests waiting beyond this are rejected ("Exceeds maximum queue size"); 0: unbounded.
        tensorrt: GPU instances with ONNX Runtime's TensorRT accelerator (FP16) instead of the default instances.

    Returns:
        The model folder ``repo/<name>``.

    Raises:
        ValueError: a bad name or number, or a model file that cannot be read (the message names it).
    """
    import onnx

    from .._version import __version__
    from ..inference import Engine, ort
    from ..inference.export import onnx_metadata

    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name must be letters, digits, '_', '.' or '-', got {name!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    for value, what in ((max_queue_delay_us, "max_queue_delay_us"), (max_queue_size, "max_queue_size")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{what} must be an int >= 0, got {value!r}")
    # the CPU engine's own graph (its ONNX bytes are exported once and cached): the repository serves exactly what
    # Engine.predict computes on the CPU, map normalisation included
    eng = Engine.from_model_file(model_file, device="cpu", backend="onnxruntime", threads=1)
    graph = eng._ort.graph
    data = ort.onnx_model(graph, image_size=eng.image_size, in_channels=eng.in_channels, input_dtype="uint8")
    m = onnx.load_from_string(data)
    normalize = getattr(eng.normalizer, "mode", "none")
    meta = onnx_metadata(image_size=eng.image_size, n=eng.n, k=eng.k, error=eng.error, thresholds=eng.thresholds)
    meta.update({"fae_fast_version": __version__, "in_channels": str(eng.in_channels),
                 "input_scaling": "uint8 images / 255 inside the graph", "map_normalize": normalize,
                 "image_score": getattr(eng.normalizer, "image_score", "max"),
                 "model_file": Path(model_file).name})
    if meta["image_score"] != "max":  # the template's smoothing (map.template_n): its passes of the map's window
        meta["template_passes"] = str(eng.normalizer.n)
        meta["frame_scale"] = str(eng.frame_scale)  # frames at this many times the network's size
        meta["template_weight"] = f"{eng.normalizer.template_weight:g}"  # its share of the pixel map
    del m.metadata_props[:]
    for key, value in meta.items():
        prop = m.metadata_props.add()
        prop.key, prop.value = key, value
    folder = Path(repo) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    write_bytes(folder / "1" / "model.onnx", m.SerializeToString())
    write_text(folder / "config.pbtxt", config_pbtxt(m, name=name, max_batch=max_batch,
                                                     max_queue_delay_us=max_queue_delay_us,
                                                     max_queue_size=max_queue_size, parameters=meta,
                                                     tensorrt=bool(tensorrt)))
    return folder

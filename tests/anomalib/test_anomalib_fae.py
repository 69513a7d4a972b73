"""fae_fast's FAE as an anomalib 2.x model: Engine.fit/test/predict/export on a tiny synthetic Folder dataset.

Runs only in the anomalib environment (scripts/anomalib_ci.sh). One module-scoped run trains 4 steps on 16
normal 64 x 64 images, tests, predicts and exports (torch and ONNX); the tests read its results.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from anomalib.data import Folder
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize, Resize

from fae_fast.config import preset
from fae_fast.integrations.anomalib import Fae
from fae_fast.synthetic import make_dataset
from fae_fast.train import lr_factor

from ..helpers import assert_close

SIZE = (64, 64)
STEPS = 4


def _images(folder) -> torch.Tensor:
    """The PNGs of ``folder`` as float (N, 3, H, W) in [0, 1], in name order."""
    imgs = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(255.0).contiguous()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("data") / "synthetic", n_train=16, n_test_good=4, n_test_defect=4,
                        size=SIZE, defects=("scratch",))
    out = tmp_path_factory.mktemp("results")
    datamodule = Folder(name="synthetic", root=root, normal_dir="train/good", abnormal_dir="test/scratch",
                        normal_test_dir="test/good", mask_dir="ground_truth/scratch", train_batch_size=8,
                        eval_batch_size=8, num_workers=0, seed=0)
    # a short warmup: 4 steps move the network off its identity init (raw maps of ~1e-7 would test rounding only)
    model = Fae(preset="tiny", config={"train": {"warmup_steps": 1}}, image_size=SIZE, visualizer=False)
    engine = Engine(max_steps=STEPS, default_root_dir=out, accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    metrics = engine.test(model=model, datamodule=datamodule)
    predictions = engine.predict(model=model, datamodule=datamodule)
    torch_path = engine.export(model=model, export_type=ExportType.TORCH, export_root=out / "export")
    onnx_path = engine.export(model=model, export_type=ExportType.ONNX, export_root=out / "export",
                              input_size=SIZE)
    return dict(root=root, model=model.eval(), engine=engine, datamodule=datamodule, metrics=metrics,
                predictions=predictions, torch_path=torch_path, onnx_path=onnx_path)


def test_fit_ran_the_fae_schedule(run):
    """max_steps steps, on fae_fast's warmup/cosine factor spanning the trainer's steps."""
    trainer, cfg = run["engine"].trainer, run["model"].cfg
    assert trainer.global_step == STEPS
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == STEPS
    assert [sched.lr_lambdas[0](i) for i in range(STEPS)] == \
        [lr_factor(i, cfg.train.warmup_steps, STEPS) for i in range(STEPS)]
    assert sched.get_last_lr()[0] == pytest.approx(cfg.train.lr * lr_factor(STEPS, cfg.train.warmup_steps, STEPS))


def test_test_metrics_exist(run):
    (metrics,) = run["metrics"]
    for name in ("image_AUROC", "pixel_AUROC"):
        assert name in metrics and math.isfinite(metrics[name]) and 0.0 <= metrics[name] <= 1.0, metrics


def test_predict_returns_scores_and_maps(run):
    batches = run["predictions"]
    n = sum(len(b.pred_score) for b in batches)
    assert n == len(run["datamodule"].test_data) > 0  # the test split (the rest of test/ validates)
    for b in batches:
        B = len(b.image)
        assert b.pred_score.shape == (B,) and torch.isfinite(b.pred_score).all()
        assert b.anomaly_map.shape[0] == B and b.anomaly_map.shape[-2:] == SIZE
        assert b.anomaly_map.numel() == B * SIZE[0] * SIZE[1]


def test_onnx_export_matches_eager(run):
    """The exported ONNX graph (pre-processor, network, FAE map, post-processor) gives eager's scores and maps.

    The post-processor rescales raw values by 1 / (max - min) of the validation values: after 4 steps the network
    is near its identity init, raw maps are ~1e-6 and that span ~1e-8, which would amplify float rounding past
    any fixed tolerance; so both sides are compared in raw units, to 1e-4 of the largest raw value (measured:
    3e-6 to 1.1e-5, the summation order of ORT's and torch's convolutions and pooling; a wrong smoothing or
    pre-processing differs by O(1)).
    """
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    opsets = {o.domain: o.version for o in onnx.load(str(run["onnx_path"])).opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == 18, opsets  # no failed down-conversion to anomalib's 14
    images = _images(run["root"] / "test" / "scratch")[:3]
    with torch.no_grad():
        eager = run["model"](images)
    sess = ort.InferenceSession(str(run["onnx_path"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: images.numpy()})))
    assert {"pred_score", "anomaly_map"} <= set(got), names
    pp = run["model"].post_processor
    for key, level in (("pred_score", "image"), ("anomaly_map", "pixel")):
        lo, hi = float(getattr(pp, f"{level}_min")), float(getattr(pp, f"{level}_max"))
        span = hi - lo
        assert span > 0 and got[key].shape == tuple(getattr(eager, key).shape), (key, span, got[key].shape)
        assert_close(torch.from_numpy(got[key]).double() * span, getattr(eager, key).double() * span,
                     atol=1e-4 * abs(hi), rtol=0.0, msg=key)


def test_torch_export_matches_eager(run):
    images = _images(run["root"] / "test" / "good")[:2]
    loaded = torch.load(run["torch_path"], map_location="cpu", weights_only=False)["model"].eval()
    with torch.no_grad():
        a, b = loaded(images), run["model"](images)
    assert torch.equal(a.pred_score, b.pred_score) and torch.equal(a.anomaly_map, b.anomaly_map)


def test_eval_forward_is_the_fae_map_and_score(run):
    """The torch model's eval output is fae_fast's smoothed squared error of the reconstruction and its max."""
    from fae_fast import reference
    from fae_fast.config import smoothing_for_size

    model = run["model"].model
    x = _images(run["root"] / "test" / "scratch")[:2]
    with torch.no_grad():
        out = model(x)
        n, k = smoothing_for_size(run["model"].cfg.map, *SIZE)
        amap, score = reference.anomaly_map(x, model.net(x), n=n, k=k)
    assert_close(out.anomaly_map, amap, msg="anomaly_map")
    assert_close(out.pred_score, score, msg="pred_score")


def test_pre_processor_only_resizes():
    transform = Fae(preset="tiny", image_size=SIZE).pre_processor.transform
    steps = list(transform.transforms)
    assert len(steps) == 1 and isinstance(steps[0], Resize) and list(steps[0].size) == list(SIZE)


def test_normalising_pre_processor_is_refused():
    normalising = PreProcessor(transform=Compose([Resize(SIZE), Normalize([0.5] * 3, [0.5] * 3)]))
    model = Fae(preset="tiny", image_size=SIZE, pre_processor=normalising)
    with pytest.raises(ValueError, match="normalises"):
        model.on_train_start()


@pytest.mark.parametrize("mode, zero", [("symmetric", True), ("independent", False)])
def test_loss_adds_the_same_eps_to_input_and_target(mode, zero):
    """An identity network reproduces input + eps exactly: with no corruption its loss is 0 iff the target
    got the same eps (independent noise on each side gives about 2 sigma^2 instead)."""
    cfg = preset("tiny")
    cfg.corruption.p = 0.0
    cfg.noise.mode = mode
    model = Fae(config=cfg, image_size=SIZE)
    x = torch.rand(4, 3, *SIZE)
    loss = float(model.loss(torch.nn.Identity(), x, step=3))
    assert (loss < 1e-10) if zero else (loss > 1e-4), loss


def test_members_each_get_their_own_loss():
    """``model.members`` = 2: the loss is the sum of each member's own loss (not the loss of their average), the
    members drawing their corruption one after the other from the loss's generator."""
    cfg = preset("tiny")
    cfg.noise.mode, cfg.model.members = "none", 2
    model = Fae(config=cfg, image_size=SIZE)
    net = model.model.net
    assert type(net).__name__ == "Members"
    x = torch.rand(4, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # the members add opposite offsets to their input: their average is the identity, each alone is not
        bias = torch.randn(3, generator=torch.Generator().manual_seed(1)) * 0.1
        net.members[0].head.bias.copy_(bias)
        net.members[1].head.bias.copy_(-bias)
        got = model.loss(net, x, step=2)
        by_hand = Fae(config=cfg, image_size=SIZE).loss
        expect = by_hand(net.members[0], x, step=2) + by_hand(net.members[1], x, step=2)
        of_mean = Fae(config=cfg, image_size=SIZE).loss(lambda t: (net.members[0](t) + net.members[1](t)) / 2, x,
                                                       step=2)
    assert_close(got, expect, atol=1e-7, rtol=1e-6)
    assert float(of_mean) < 0.9 * float(got) / 2, (float(of_mean), float(got))


def test_model_api():
    model = Fae(preset="tiny", image_size=SIZE)
    assert model.learning_type.value == "one_class"
    args = model.trainer_arguments
    assert args["gradient_clip_val"] == preset("tiny").train.grad_clip and args["num_sanity_val_steps"] == 0
    with pytest.raises(ValueError, match="image_size"):
        Fae(preset="cpu")  # sized from the data ("auto"): the adapter needs a size

"""The inference engine against the fp32 eager model (the oracle: unfolded network + reference anomaly map).

CPU tests use the reference map backend; the ``gpu`` tests cover bf16 + channels_last + torch.compile + CUDA
graphs + the Triton map, the host->device->host path and the padded batch sizes.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from fae_fast import reference
from fae_fast.config import MapConfig, ModelConfig
from fae_fast.inference import Engine, InferenceResult, plan_batches
from fae_fast.models import build_model
from tests.helpers import assert_close

H, W = 19, 26  # odd and non-square: the U-Net pads and crops
N_SMOOTH, K_SMOOTH = 2, 5


def tiny_model(seed: int = 0, widths=(8, 16)) -> nn.Module:
    """A small fae_fast U-Net whose BN statistics and residual head are random, so that folding and the map are
    exercised (the untrained head is zero, which would make every map 0). The same seed gives the same weights
    (the convolutions' init is seeded too, without touching the global RNG): a test's outcome must not depend on
    which tests ran before it (the bf16 bound below failed for 1 of 12 unseeded inits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = build_model(ModelConfig(widths=widths, dilations=(1, 2)))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) * 0.4 - 0.2)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) * 1.5 + 0.5)
                mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(mod.num_features, generator=g) * 0.2 - 0.1)
        m.head.weight.copy_(torch.randn(m.head.weight.shape, generator=g) * 0.1)
        m.head.bias.copy_(torch.randn(m.head.bias.shape, generator=g) * 0.01)
    return m.eval()


def frames(b: int, seed: int = 1, h: int = H, w: int = W) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def eager_reference(model, x, n=N_SMOOTH, k=K_SMOOTH, autocast_dtype=None, error=None):
    """fp32 eager oracle (or plain autocast at ``autocast_dtype``): (map (B, H, W), score (B,))."""
    xf = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    dev = x.device.type
    with torch.no_grad(), torch.autocast(dev, dtype=autocast_dtype or torch.bfloat16,
                                         enabled=autocast_dtype is not None):
        net = model if next(model.parameters()).device == x.device else copy.deepcopy(model).to(x.device)
        recon = net(xf)
    m, s = reference.anomaly_map(xf, recon.float(), n=n, k=k, error=error or MapConfig().error)  # engine default
    return m[:, 0], s


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, thresholds={"image": 1e-3, "pixel": 5e-4},
                  device="cpu")


@pytest.mark.parametrize("kind", ["uint8", "float32"])
def test_fp32_engine_matches_eager(model, engine, kind):
    x = frames(3)
    inp = x if kind == "uint8" else x.float() / 255
    res = engine.predict(inp)
    ref_map, ref_score = eager_reference(model, inp)
    assert isinstance(res, InferenceResult) and len(res) == 3
    assert res.anomaly_map.shape == (3, H, W) and res.anomaly_map.dtype == torch.float32
    assert float(ref_score.min()) > 0  # a non-trivial map
    assert_close(res.anomaly_map, ref_map, atol=1e-7, rtol=1e-4, msg="map")
    assert_close(res.pred_score, ref_score, atol=1e-7, rtol=1e-4, msg="score")


def test_bf16_error_bounded_by_plain_autocast(model):
    """bf16 engine vs fp32 eager: at most twice the error of plain bf16 autocast of the same network (+1e-6)."""
    eng = Engine(model, image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, dtype="bf16", device="cpu")
    assert eng.dtype == torch.bfloat16
    x = frames(4, seed=3)
    res = eng.predict(x)
    ref_map, ref_score = eager_reference(model, x)
    ac_map, ac_score = eager_reference(model, x, autocast_dtype=torch.bfloat16)
    err_map = (res.anomaly_map - ref_map).abs().max()
    err_score = (res.pred_score - ref_score).abs().max()
    assert err_map <= 2 * (ac_map - ref_map).abs().max() + 1e-6, (err_map, (ac_map - ref_map).abs().max())
    assert err_score <= 2 * (ac_score - ref_score).abs().max() + 1e-6
    assert_close(res.pred_score, ref_score, atol=1e-6, rtol=5e-2, msg="bf16 score")


def test_engine_leaves_model_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Engine(model, image_size=(H, W), device="cpu")
    assert model.residual is True and not model.training
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bn_is_folded(engine):
    assert not any(isinstance(m, nn.BatchNorm2d) for m in engine.model.modules())
    conv = next(m for m in engine.model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.requires_grad


def test_thresholds_default_override_and_none(engine):
    x = frames(4, seed=5)
    base = engine.predict(x)
    assert base.image_threshold == 1e-3 and base.pixel_threshold == 5e-4
    assert torch.equal(base.pred_mask, base.anomaly_map > 5e-4)
    assert torch.equal(base.pred_label, base.pred_score > 1e-3)
    med = float(base.pred_score.median())
    pix = float(base.anomaly_map.median())
    over = engine.predict(x, image_threshold=med, pixel_threshold=pix)  # per call, nothing rebuilt
    assert torch.equal(over.pred_label, base.pred_score > med)
    assert torch.equal(over.pred_mask, base.anomaly_map > pix)
    assert 0 < int(over.pred_label.sum()) < 4 and 0 < float(over.pred_mask.float().mean()) < 1
    assert engine.thresholds == {"image": 1e-3, "pixel": 5e-4}  # overrides are per call only
    assert torch.equal(over.pred_score, base.pred_score)
    no_thr = Engine(engine.model, image_size=(H, W), fold_bn=False, n=N_SMOOTH, k=K_SMOOTH, device="cpu")
    r = no_thr.predict(x)
    assert r.pred_mask is None and r.pred_label is None
    r = no_thr.predict(x, pixel_threshold=pix, return_map=False)
    assert r.anomaly_map is None and r.pred_mask.shape == (4, H, W) and r.pred_label is None
    no_thr.set_thresholds(image=med)
    assert no_thr.thresholds == {"image": med, "pixel": None}


@pytest.mark.parametrize("bad, exc", [({"image": float("nan")}, ValueError), ({"img": 1.0}, ValueError),
                                      ([0.1, 0.2], TypeError), ({"image": "0.1"}, TypeError)])
def test_bad_thresholds(model, bad, exc):
    with pytest.raises(exc):
        Engine(model, image_size=(H, W), device="cpu", thresholds=bad)


def test_numpy_camera_layout_and_grey(engine):
    x = frames(2, seed=7)
    t = engine.predict(x)
    nhwc = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
    r = engine.predict(nhwc)
    assert isinstance(r.pred_score, np.ndarray) and r.anomaly_map.shape == (2, H, W)
    np.testing.assert_allclose(r.pred_score, t.pred_score.numpy(), rtol=1e-6)
    single = engine.predict(nhwc[1])  # (H, W, C)
    np.testing.assert_allclose(single.pred_score, t.pred_score.numpy()[1:], rtol=1e-6)
    grey = x[:1, :1]
    g = engine.predict(grey)  # (1, 1, H, W) -> replicated to 3 channels
    assert_close(g.pred_score, engine.predict(grey.expand(-1, 3, -1, -1)).pred_score)
    g2 = engine.predict(grey[0, 0].numpy())  # (H, W) numpy
    np.testing.assert_allclose(g2.pred_score, g.pred_score.numpy(), rtol=1e-6)


def test_input_validation(engine, model):
    with pytest.raises(ValueError, match=r"\(B, 3, 19, 26\).*\(2, 3, 19, 25\)"):
        engine.predict(torch.zeros(2, 3, H, W - 1, dtype=torch.uint8))
    with pytest.raises(TypeError, match="int32"):
        engine.predict(torch.zeros(1, 3, H, W, dtype=torch.int32))
    with pytest.raises(TypeError, match="list"):
        engine.predict([[0]])
    with pytest.raises(ValueError, match="CUDA"):
        Engine(model, image_size=(H, W), device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="odd"):
        Engine(model, image_size=(H, W), device="cpu", k=4)
    with pytest.raises(ValueError, match=r"template_n \(the template's box-filter passes\).*got 9"):
        Engine(model, image_size=(H, W), device="cpu", template_n=9)
    with pytest.raises(ValueError, match="dtype"):
        Engine(model, image_size=(H, W), device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="image_size"):
        Engine(model, image_size=(H,), device="cpu")
    with pytest.raises(TypeError, match="nn.Module"):
        Engine(lambda x: x, image_size=(H, W))


def test_default_smoothing_follows_image_size(model):
    from fae_fast.config import MapConfig, smoothing_for_size

    eng = Engine(model, image_size=(64, 64), device="cpu")
    assert (eng.n, eng.k) == smoothing_for_size(MapConfig(), 64, 64)


@pytest.mark.parametrize("batch, sizes, expected", [
    (1, (1, 16, 64), [(0, 1, 1)]),
    (3, (1, 4, 16), [(0, 3, 4)]),
    (16, (1, 16, 64), [(0, 16, 16)]),
    (17, (1, 16, 64), [(0, 17, 64)]),
    (150, (1, 16, 64), [(0, 64, 64), (64, 64, 64), (128, 22, 64)]),
    (5, None, [(0, 5, 5)]),
])
def test_plan_batches(batch, sizes, expected):
    plan = plan_batches(batch, sizes)
    assert plan == expected
    assert sum(c for _, c, _ in plan) == batch


def test_from_model_file(tmp_path, model):
    from fae_fast.checkpoint import save_model_file
    from fae_fast.config import FAEConfig

    cfg = FAEConfig()
    cfg.model.widths, cfg.model.dilations = (8, 16), (1, 2)
    cfg.map.normalize = "none"  # raw maps (a normalising model file carries its statistics: test_recipe.py)
    path = save_model_file(tmp_path / "m.pt", model_state=model.state_dict(), config=cfg, image_size=(H, W),
                           thresholds={"image": 0.25, "pixel": 0.5})
    eng = Engine.from_model_file(path, device="cpu")
    assert eng.image_size == (H, W) and eng.thresholds == {"image": 0.25, "pixel": 0.5}
    x = frames(2, seed=11)
    ref_map, ref_score = eager_reference(model, x, n=eng.n, k=eng.k)
    assert_close(eng.predict(x).pred_score, ref_score, atol=1e-7, rtol=1e-4)
    eng2 = Engine.from_model_file(path, device="cpu", thresholds={"image": 1.0})
    assert eng2.thresholds == {"image": 1.0, "pixel": None}


def test_compiled_cpu_engine_matches_eager(model):
    """torch.compile on the CPU (the one compile test of this file: ~25 s the first time in a process)."""
    eng = Engine(model, image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu", compile=True)
    x = frames(2, seed=13)
    ref_map, ref_score = eager_reference(model, x)
    res = eng.predict(x)
    assert_close(res.anomaly_map, ref_map, atol=1e-7, rtol=1e-4)
    assert_close(res.pred_score, ref_score, atol=1e-7, rtol=1e-4)


def _unit_template_stats(h: int, w: int) -> dict:
    """Valid "max+template" statistics of frames h x w (zero means, unit spreads): the raw maps pass through."""
    one, zero = torch.ones((1, 1, h, w)), torch.zeros((1, 1, h, w))
    return {"mean": zero, "scale": one, "template_mean": zero.clone(), "template_scale": one.clone(),
            "score_center": torch.tensor(0.0), "score_spread": torch.tensor(1.0),
            "template_center": torch.tensor(0.0), "template_spread": torch.tensor(1.0)}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_frame_scale_engine_matches_its_eager_pipeline(model, device):
    """``frame_scale = 2``: frames of twice the network's size; the compiled (and on CUDA graph-captured) engine
    scores as the plain eager pipeline of the same settings (the network on the area mean, its map replicated,
    the template on the frame); on the CPU the PyTorch backend is that pipeline with BN folded."""
    from fae_fast.scoring import frame_map, network_view

    stats = _unit_template_stats(2 * H, 2 * W)
    kw = dict(image_size=(2 * H, 2 * W), n=N_SMOOTH, k=K_SMOOTH, normalize="zscore", map_stats=stats,
              image_score="max+template", template_n=1, frame_scale=2)
    eng = Engine(model, device=device, dtype="fp32", batch_sizes=(4,), **kw) if device == "cuda" else \
        Engine(model, device=device, backend="torch", **kw)
    x = frames(5, seed=23, h=2 * H, w=2 * W)
    ref = eng.reference_pipeline(model)
    with torch.inference_mode():
        ref_map, ref_score = ref(x.to(eng.device))
    res = eng.predict(x.to(eng.device))
    assert res.anomaly_map.shape == (5, 2 * H, 2 * W)
    assert_close(res.anomaly_map, ref_map[:, 0], atol=1e-5, rtol=1e-4)
    assert_close(res.pred_score, ref_score, atol=1e-5, rtol=1e-4)
    # the network part is the usual map of the frames' view, one value per network pixel
    view_map, _ = eager_reference(model, network_view(x, 2))
    assert_close(res.anomaly_map.cpu(), frame_map(view_map[:, None], 2)[:, 0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="frame_scale must be an int in 1..4 dividing the frame size"):
        Engine(model, device="cpu", **{**kw, "image_size": (2 * H + 1, 2 * W)})
    with pytest.raises(ValueError, match="needs image_score 'max\\+template'"):
        Engine(model, device="cpu", image_size=(2 * H, 2 * W), frame_scale=2)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cuda_graph_engine_matches_eager(model, dtype):
    dev = torch.device("cuda")
    eng = Engine(model, image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, dtype=dtype, device=dev,
                 batch_sizes=(1, 4, 8), thresholds={"image": 1e-3, "pixel": 5e-4})
    assert eng.cuda_graphs and eng.compile_mode == "default" and eng.map_backend in ("triton", "torch")
    x = frames(11, seed=17).to(dev)  # 8 + 3 padded to 4: two graphs, one padded
    ref_map, ref_score = eager_reference(model, x)
    ac = torch.bfloat16 if dtype == "bf16" else torch.float16
    ac_map, ac_score = eager_reference(model, x, autocast_dtype=ac)
    res = eng.predict(x)
    assert res.pred_score.device.type == "cuda"
    assert (res.anomaly_map - ref_map).abs().max() <= 2 * (ac_map - ref_map).abs().max() + 1e-6
    assert (res.pred_score - ref_score).abs().max() <= 2 * (ac_score - ref_score).abs().max() + 1e-6
    # the host path (pinned buffers, async copies) gives the same numbers
    host = eng.predict(x.cpu())
    assert host.pred_score.device.type == "cpu"
    assert_close(host.pred_score, res.pred_score.cpu(), atol=0, rtol=0)
    assert_close(host.anomaly_map, res.anomaly_map.cpu(), atol=0, rtol=0)
    # replays of one captured size are independent of earlier inputs
    a = eng.predict(x[:4]).pred_score
    eng.predict(x[4:8])
    assert torch.equal(eng.predict(x[:4]).pred_score, a)


@pytest.mark.gpu
def test_cuda_run_returns_static_buffers_and_float_input(model):
    dev = torch.device("cuda")
    with pytest.raises(ValueError, match="reduce-overhead"):
        Engine(model, image_size=(H, W), device=dev, compile="reduce-overhead")
    eng = Engine(model, image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device=dev, batch_sizes=(2,)).warmup()
    x = frames(2, seed=19).to(dev).contiguous(memory_format=torch.channels_last)
    m1, s1 = eng.run(x)
    keep = s1.clone()
    m2, s2 = eng.run(x.flip(0))
    assert s1.data_ptr() == s2.data_ptr()  # static outputs: documented, copy to keep
    assert torch.allclose(keep.flip(0), s2)
    f = eng.predict(x.float() / 255).pred_score  # a float input captures its own graph
    assert_close(f, keep, atol=1e-6, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_default_model_batch_sizes():
    """The benchmark's network at 256^2: every batch size of the benchmark captures and agrees with eager."""
    from fae_fast.inference.bench import make_model

    dev = torch.device("cuda")
    net = make_model()
    eng = Engine(net, image_size=(256, 256), device=dev, batch_sizes=(1, 16, 64))
    x = torch.randint(0, 256, (64, 3, 256, 256), dtype=torch.uint8, device=dev)
    ref_map, ref_score = eager_reference(net, x[:16], n=eng.n, k=eng.k)
    ac_map, ac_score = eager_reference(net, x[:16], n=eng.n, k=eng.k, autocast_dtype=torch.bfloat16)
    for b in (1, 16, 64):
        s = eng.predict(x[:b]).pred_score[:16]
        bound = 2 * (ac_score[:b] - ref_score[:b]).abs().max() + 1e-6
        assert (s - ref_score[:b]).abs().max() <= bound, b


def test_bench_model_takes_the_presets_members():
    """``fae-fast bench --preset P`` measures P's network as trained: with ``model.members`` > 1 all its members,
    each with a non-zero residual head (an identity member would cost the same but score nothing)."""
    from fae_fast.inference.bench import make_model
    from fae_fast.models import Members

    one = make_model((8, 16), (1,))
    two = make_model((8, 16), (1,), members=2)
    assert not isinstance(one, Members) and float(one.head.weight.abs().sum()) > 0
    assert isinstance(two, Members) and len(two.members) == 2 and not two.training
    assert all(float(m.head.weight.abs().sum()) > 0 for m in two.members)


def test_triton_map_backend_through_the_engine(model):
    """The engine with the Triton anomaly-map kernel (interpreted on the CPU) equals the reference backend."""
    pytest.importorskip("triton")
    eng = Engine(model, image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu", map_backend="triton")
    assert eng.map_backend == "triton"
    x = frames(2, seed=29)
    ref_map, ref_score = eager_reference(model, x)
    res = eng.predict(x)
    assert_close(res.anomaly_map, ref_map, atol=1e-7, rtol=1e-4)
    assert_close(res.pred_score, ref_score, atol=1e-7, rtol=1e-4)

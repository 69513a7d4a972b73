"""Training loop, scoring and thresholds on tiny models (widths (8, 16), 32 x 32 images, a few steps)."""
import copy
import os

import numpy as np
import pytest
import torch

from fae_fast import checkpoint as ckpt
from fae_fast import ops, reference, synthetic
from fae_fast.config import FAEConfig
from fae_fast.scoring import autocast_dtype, compute_maps, resolve_device, thresholds_from_holdout
from fae_fast.train import NOISE_MODES, lr_factor, split_holdout, step_seed, train


@pytest.fixture(scope="module")
def images():
    """12 brushed-metal images of 32 x 32 from the synthetic generator, uint8 (12, 3, 32, 32)."""
    out = []
    for i in range(12):
        rng = np.random.default_rng(i)
        out.append(synthetic._finish(synthetic.surface(rng, (32, 32)), rng))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _cfg(steps=4, mode="symmetric", seed=0, **train_kw):
    cfg = FAEConfig()
    cfg.model.widths = (8, 16)
    cfg.model.dilations = (1, 2)
    cfg.noise.mode = mode
    t = cfg.train
    t.steps, t.batch_size, t.image_size, t.lr, t.warmup_steps = steps, 4, (32, 32), 3e-3, 2
    t.holdout_fraction, t.checkpoint_every, t.seed, t.device, t.amp = 0.25, 2, seed, "cpu", "fp32"
    for k, v in train_kw.items():
        setattr(t, k, v)
    return cfg


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max {(a[k].double() - b[k].double()).abs().max()})"


# ---------------------------------------------------------------------------------------------------- helpers

def test_step_seed():
    seeds = {step_seed(0, s) for s in range(1000)} | {step_seed(1, s) for s in range(1000)}
    assert len(seeds) == 2000 and all(0 <= s < 2 ** 63 for s in seeds)
    assert step_seed(3, 7) == step_seed(3, 7) != step_seed(3, 7, stream=1)


def test_lr_factor_warmup_then_cosine():
    f = [lr_factor(i, 5, 50) for i in range(50)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:5], f[1:5]))          # rising during warmup
    assert all(a >= b for a, b in zip(f[4:], f[5:]))          # then non-increasing
    assert 0.0 < f[-1] < 0.01
    assert lr_factor(0, 0, 1) > 0.0


def test_split_holdout():
    tr, ho = split_holdout(20, 0.1, seed=4)
    assert len(ho) == 2 and len(tr) == 18 and set(tr.tolist()) | set(ho.tolist()) == set(range(20))
    assert torch.equal(ho, split_holdout(20, 0.1, seed=4)[1])
    assert len(split_holdout(3, 0.01, 0)[1]) == 1   # at least one when a fraction is asked for
    assert len(split_holdout(1, 0.5, 0)[0]) == 1    # and at least one image stays for training
    assert len(split_holdout(20, 0.0, 0)[1]) == 0
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_holdout(5, 1.0, 0)


# ---------------------------------------------------------------------------------------------------- scoring

def test_compute_maps_matches_reference_and_restores_mode():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3))
    net.train()
    x = torch.randint(0, 256, (5, 3, 17, 23), dtype=torch.uint8)
    maps, scores = compute_maps(net, x, n=2, k=5, error="gradient", batch_size=2)
    assert net.training  # the caller's mode is restored
    with torch.no_grad():
        ref_map, ref_score = reference.anomaly_map(x, net.eval()(x.float() / 255), n=2, k=5, error="gradient")
    assert maps.shape == (5, 1, 17, 23) and maps.dtype == torch.float32 and scores.shape == (5,)
    torch.testing.assert_close(maps, ref_map)
    torch.testing.assert_close(scores, ref_score)
    with pytest.raises(ValueError, match="uint8"):
        compute_maps(net, x.float(), n=2, k=5)
    with pytest.raises(ValueError, match="amp"):
        compute_maps(net, x, n=2, k=5, amp="fp8")


def test_thresholds_from_holdout():
    scores = torch.arange(101, dtype=torch.float32)
    maps = torch.arange(1000, dtype=torch.float32).view(10, 1, 10, 10)
    t = thresholds_from_holdout(scores, maps, 0.99, 0.5)
    assert t["image"] == pytest.approx(99.0) and t["pixel"] == pytest.approx(499.5)
    with pytest.raises(ValueError, match="quantile"):
        thresholds_from_holdout(scores, maps, 1.5, 0.5)
    with pytest.raises(ValueError, match="at least one"):
        thresholds_from_holdout(scores[:0], maps[:0], 0.5, 0.5)


def test_device_and_amp_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype("fp16", torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu:0")


# ---------------------------------------------------------------------------------------------------- training

def _fixed_batch_loss(model, images, cfg):
    """Loss of ``model`` on one fixed corrupted, noisy batch (target: the clean images)."""
    from fae_fast.corruption import Corruptor

    g = torch.Generator().manual_seed(123)
    c = Corruptor(cfg.corruption, image_size=(32, 32), device="cpu")(images.float() / 255, g, pool=images)
    inp = ops.corrupt_and_noise(images, c.texture, c.mask_beta, 0.2, 7)
    # batch statistics: after a dozen steps the BatchNorm running averages are still far from converged
    m = copy.deepcopy(model).train()
    with torch.no_grad():
        return float(ops.noisy_target_loss(m(inp), images, 0.0, 7))


def test_loss_decreases(images):
    """A dozen steps already learn something measurable: denoising ("input" mode, no occlusions, large sigma).

    The full FAE objective starts from the identity (residual U-Net) and needs hundreds of steps to beat it,
    so the tiny-budget check uses the part of the task a few steps can learn, on a fixed evaluation batch.
    """
    cfg = _cfg(steps=12, mode="input", lr=1e-2, batch_size=8)
    cfg.corruption.p, cfg.noise.sigma_max = 0.0, 0.3
    res = train(cfg, images, progress=False, log_every=4)
    cfg0 = copy.deepcopy(cfg)
    cfg0.train.steps = 0
    init = train(cfg0, images, progress=False)
    assert init.history == [] and init.step == 0
    before, after = _fixed_batch_loss(init.model, images, cfg), _fixed_batch_loss(res.model, images, cfg)
    assert after < 0.85 * before, (before, after)
    assert [h["step"] for h in res.history] == [4, 8, 12]
    assert all(h["img_per_s"] > 0 and h["lr"] > 0 and np.isfinite(h["loss"]) for h in res.history)
    assert not res.model.training and res.step == 12
    # thresholds come from the 3 held-out images (25 % of 12)
    assert res.holdout_scores.shape == (3,) and len(res.holdout_indices) == 3
    assert res.thresholds["image"] == pytest.approx(float(np.quantile(res.holdout_scores.double().numpy(), 0.99)))
    assert 0 < res.thresholds["pixel"] <= res.holdout_scores.max()


def test_noise_modes_reach_the_ops(images, monkeypatch):
    """Each mode hands the right (sigma, seed) pairs to the injection and to the loss."""
    calls = []
    real_in, real_loss = ops.corrupt_and_noise, ops.noisy_target_loss

    def spy_in(x, t, m, sigma, seed, **kw):
        calls.append(("in", sigma.clone(), seed))
        return real_in(x, t, m, sigma, seed, **kw)

    def spy_loss(r, x, sigma, seed, **kw):
        calls.append(("loss", sigma.clone(), seed))
        return real_loss(r, x, sigma, seed, **kw)

    monkeypatch.setattr(ops, "corrupt_and_noise", spy_in)
    monkeypatch.setattr(ops, "noisy_target_loss", spy_loss)
    for mode in NOISE_MODES:
        calls.clear()
        res = train(_cfg(steps=1, mode=mode), images, progress=False, log_every=1)
        assert len(res.history) == 1 and np.isfinite(res.history[0]["loss"])
        assert [c[0] for c in calls] == ["in", "loss"]
        (_, s_in, seed_in), (_, s_t, seed_t) = calls
        assert seed_in == step_seed(0, 0)
        if mode == "none":
            assert not s_in.any() and not s_t.any()
        else:
            assert (s_in > 0).all() and (s_in <= 0.1).all()
        if mode == "symmetric":
            assert torch.equal(s_in, s_t) and seed_t == seed_in
        elif mode == "input":
            assert not s_t.any()
        elif mode == "independent":
            assert torch.equal(s_in, s_t) and seed_t != seed_in


def test_reproducible_on_cpu(images):
    a = train(_cfg(steps=3), images, progress=False)
    b = train(_cfg(steps=3), images, progress=False)
    c = train(_cfg(steps=3, seed=1), images, progress=False)
    _assert_same_weights(_weights(a.model), _weights(b.model))
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert not all(torch.equal(v, _weights(c.model)[k]) for k, v in _weights(a.model).items())


def test_resume_is_bit_exact(images, tmp_path):
    straight = train(_cfg(steps=6), images, progress=False, log_every=1)
    p = tmp_path / "state.pt"
    first = train(_cfg(steps=6), images, progress=False, log_every=1, checkpoint=p, stop_at=3)
    assert first.step == 3 and ckpt.load_train_state(p)["step"] == 3
    resumed = train(_cfg(steps=6), images, progress=False, log_every=1, checkpoint=p, resume=p)
    _assert_same_weights(_weights(straight.model), _weights(resumed.model))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert ckpt.load_train_state(p)["step"] == 6
    assert resumed.thresholds == straight.thresholds


def test_members_train_each_on_its_own_loss(images, tmp_path):
    """``model.members`` = 2: member i is, weight for weight, the one-network run seeded ``member_seed(seed, i)``
    on the same images (its own initialisation, batches, corruption and noise: the loss of the average would change
    it), member 0 the run of the seed itself; each member's gradient is clipped alone; the run resumes bit for bit;
    torchrun is refused."""
    from types import SimpleNamespace

    from fae_fast.models import Members
    from fae_fast.train import _Trainer, member_seed

    assert member_seed(0, 0) == 0 and member_seed(0, 1) not in (0, 1) and member_seed(1, 1) != member_seed(0, 1)
    cfg = _cfg(steps=3)
    cfg.model.members = 2
    two = _Trainer(cfg, images, torch.device("cpu"))
    assert isinstance(two.model, Members) and len(two.model.members) == 2
    init = [_weights(m) for m in two.model.members]
    for step in range(3):
        two.step(step)
    for i, member in enumerate(two.model.members):
        one = _Trainer(_cfg(steps=3, seed=member_seed(0, i)), images, torch.device("cpu"))
        _assert_same_weights(_weights(one.model), init[i])
        for step in range(3):
            one.step(step)
        _assert_same_weights(_weights(one.model), _weights(member))
    assert not torch.equal(init[0]["stem.0.conv.weight"], init[1]["stem.0.conv.weight"])
    assert not torch.equal(init[0]["stem.0.conv.weight"], _weights(two.model.members[0])["stem.0.conv.weight"])
    # each member's gradient clipped to the bound alone (clipping both together would leave each below it)
    clipped = _cfg(steps=2, grad_clip=1e-4)
    clipped.model.members = 2
    tr = _Trainer(clipped, images[:8], torch.device("cpu"))
    tr.step(0)
    for params in tr.param_sets:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        assert float(norm) == pytest.approx(1e-4, rel=1e-3)
    # resume
    cfg4 = _cfg(steps=4)
    cfg4.model.members = 2
    straight = train(cfg4, images, progress=False, log_every=1)
    p = tmp_path / "state.pt"
    train(cfg4, images, progress=False, log_every=1, checkpoint=p, stop_at=2)
    resumed = train(cfg4, images, progress=False, log_every=1, checkpoint=p, resume=p)
    _assert_same_weights(_weights(straight.model), _weights(resumed.model))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    state = ckpt.load_train_state(p)  # a file without the other members' streams is refused, not half-resumed
    del state["member_draws"]
    ckpt.save_train_state(tmp_path / "shared.pt", state)
    with pytest.raises(ValueError, match=r"shared\.pt holds the batch streams of 1 member\(s\), this run trains 2"):
        train(cfg4, images, progress=False, checkpoint=tmp_path / "again.pt", resume=tmp_path / "shared.pt")
    with pytest.raises(ValueError, match=r"model\.members=2 cannot run under torchrun"):
        _Trainer(cfg, images[:8], torch.device("cpu"), dist=SimpleNamespace(active=True, world_size=2))


def test_weight_ema_is_the_ramped_average_of_the_live_weights():
    from fae_fast.train import WeightEma

    live = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    ema = WeightEma(live, decay=0.5)
    start = _weights(live)
    expected = {k: v.clone() for k, v in start.items()}
    for t in range(3):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(1.0)
        live.train()(torch.randn(4, 1, 3, 3))  # moves BatchNorm's statistics and its step count
        ema.update(t)
        d = min(0.5, (1 + t) / (10 + t))
        for k, v in live.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    got = ema.model.state_dict()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)
    assert int(got["1.num_batches_tracked"]) == 3 and not ema.model.training
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_is_the_saved_model_and_resumes_bit_exact(images, tmp_path):
    live = train(_cfg(steps=6), images, progress=False)
    straight = train(_cfg(steps=6, ema_decay=0.9), images, progress=False)
    # the live weights are the same run's; the model returned (and thresholded) is their average
    assert not all(torch.equal(v, _weights(straight.model)[k]) for k, v in _weights(live.model).items())
    assert straight.thresholds != live.thresholds
    # the average does not steer training: the run's live weights are those of the run without it
    _assert_same_weights(_weights(straight.live_model), _weights(live.model))
    assert live.live_model is None
    p = tmp_path / "state.pt"
    train(_cfg(steps=6, ema_decay=0.9), images, progress=False, checkpoint=p, stop_at=3)
    resumed = train(_cfg(steps=6, ema_decay=0.9), images, progress=False, checkpoint=p, resume=p)
    _assert_same_weights(_weights(straight.model), _weights(resumed.model))
    assert resumed.thresholds == straight.thresholds
    with pytest.raises(ValueError, match="train.ema_decay"):
        train(_cfg(steps=6), images, progress=False, resume=p)
    with pytest.raises(ValueError, match=r"train.ema_decay must be in \[0, 1\)"):
        train(_cfg(steps=6, ema_decay=1.0), images, progress=False)


def test_periodic_checkpoints(images, tmp_path, monkeypatch):
    steps_saved = []
    real = ckpt.save_train_state

    def spy(path, state):
        steps_saved.append(state["step"])
        return real(path, state)

    monkeypatch.setattr("fae_fast.train.save_train_state", spy)
    train(_cfg(steps=3, checkpoint_every=2), images, progress=False, checkpoint=tmp_path / "s.pt")
    assert steps_saved == [2, 3]
    assert sorted(os.listdir(tmp_path)) == ["s.pt"]


def test_failed_checkpoint_write_keeps_the_old_one(images, tmp_path, monkeypatch):
    p = tmp_path / "state.pt"
    train(_cfg(steps=2), images, progress=False, checkpoint=p)
    before = p.read_bytes()

    def broken(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(ckpt, "_write", broken)
    with pytest.raises(OSError, match="simulated crash"), pytest.warns(UserWarning, match="stretched"):
        train(_cfg(steps=4), images, progress=False, checkpoint=p, resume=p)
    assert p.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["state.pt"]
    monkeypatch.undo()
    assert ckpt.load_train_state(p)["step"] == 2


def test_resume_refuses_another_config(images, tmp_path):
    p = tmp_path / "state.pt"
    train(_cfg(steps=2), images, progress=False, checkpoint=p)
    cfg = _cfg(steps=4)
    cfg.noise.sigma_max = 0.2
    with pytest.raises(ValueError, match=r"noise\.sigma_max"):
        train(cfg, images, progress=False, resume=p)
    with pytest.raises(ValueError, match="model file|training-state"):
        train(_cfg(steps=4), images, progress=False, resume=tmp_path)


def test_resume_of_a_state_from_before_a_changed_default_refuses_todays_default(images, tmp_path):
    """A state written before corruption.w_self existed trained without own-surface textures: resuming it with
    today's default would mix two recipes in one run."""
    p = tmp_path / "state.pt"
    train(_cfg(steps=2), images, progress=False, checkpoint=p)
    obj = torch.load(p, weights_only=True)
    del obj["config"]["corruption"]["w_self"], obj["config"]["corruption"]["grey_textures"]
    obj.pop("checksum", None)
    torch.save(ckpt._with_checksum(obj), p)
    with pytest.raises(ValueError, match=r"corruption\.w_self \(0\.0 -> 0\.4\)"):
        train(_cfg(steps=4), images, progress=False, resume=p)
    old = _cfg(steps=4)
    old.corruption.w_self, old.corruption.grey_textures = 0.0, "off"
    with pytest.warns(UserWarning, match="stretched"):
        train(old, images, progress=False, resume=p)


def test_explicit_holdout(images):
    res = train(_cfg(steps=1), images[:8], holdout=images[8:], progress=False)
    assert res.holdout_scores.shape == (4,) and res.holdout_indices is None


def test_bad_inputs(images):
    with pytest.raises(ValueError, match="image_size"):
        train(_cfg(steps=1), images[:, :, :16], progress=False)
    with pytest.raises(ValueError, match="uint8"):
        train(_cfg(steps=1), images.float(), progress=False)
    with pytest.raises(ValueError, match="noise.mode"):
        train(_cfg(steps=1, mode="both"), images, progress=False)
    with pytest.raises(TypeError, match="FAEConfig"):
        train({}, images, progress=False)
    with pytest.raises(ValueError, match="holdout"):
        train(_cfg(steps=1), images, holdout=images[:, :, :16], progress=False)


# ---------------------------------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
def test_cuda_bf16_training_and_resume(images, tmp_path):
    """The CUDA path: bf16 autocast, fused AdamW, device generator, Triton ops, pinned scoring, resume."""
    p = tmp_path / "state.pt"
    cfg = _cfg(steps=6, device="cuda", amp="auto")
    first = train(cfg, images, progress=False, log_every=1, checkpoint=p, stop_at=3)
    assert next(first.model.parameters()).is_cuda
    resumed = train(cfg, images, progress=False, log_every=1, checkpoint=p, resume=p)
    assert resumed.step == 6 and [h["step"] for h in resumed.history] == list(range(1, 7))
    assert all(np.isfinite(h["loss"]) for h in resumed.history)
    assert ops.last_backend("corrupt_and_noise") in ("triton", "torch")
    assert np.isfinite(resumed.thresholds["image"]) and np.isfinite(resumed.thresholds["pixel"])


@pytest.mark.gpu
def test_cuda_compute_maps_matches_cpu(images):
    res = train(_cfg(steps=2), images, progress=False)
    cpu_maps, cpu_scores = compute_maps(res.model, images, n=2, k=5, amp="fp32")
    gpu_model = copy.deepcopy(res.model).cuda()
    maps, scores = compute_maps(gpu_model, images.cuda(), n=2, k=5, amp="fp32", batch_size=5)
    assert maps.device.type == "cpu" and scores.device.type == "cpu"
    torch.testing.assert_close(maps, cpu_maps, atol=1e-5, rtol=1e-3)
    bf_maps, _ = compute_maps(gpu_model, images, n=2, k=5, amp="bf16")
    # bf16 changes every value a little; the map must still single out the same regions
    corr = torch.corrcoef(torch.stack([bf_maps.flatten(), cpu_maps.flatten()]))[0, 1]
    assert torch.isfinite(bf_maps).all() and corr > 0.9, float(corr)


def test_resume_on_another_device_type_is_refused(images, tmp_path):
    p = tmp_path / "state.pt"
    train(_cfg(steps=2), images, progress=False, checkpoint=p, stop_at=1)
    state = ckpt.load_train_state(p)
    state["device_type"] = "cuda"  # as if written by a GPU run
    ckpt.save_train_state(p, state)
    with pytest.raises(ValueError, match="written by a run on cuda, this run is on cpu"):
        train(_cfg(steps=2), images, progress=False, resume=p)

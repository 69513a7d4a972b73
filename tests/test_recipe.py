"""Each knob of the training recipe does what it says (issue 10), on tiny synthetic data."""
import importlib.util

import numpy as np
import pytest
import torch

from fae_fast import ops
from fae_fast.config import CorruptionConfig, FAEConfig, preset
from fae_fast.corruption import Corruptor
from fae_fast.data import TrainSampler
from fae_fast.scoring import map_statistics, normalize_maps


# ---------------------------------------------------------------------------------------------- crops
def test_sampler_crops_are_windows_of_the_source_images():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 20, 30), dtype=torch.uint8, generator=g)
    s = TrainSampler(images, 7, torch.Generator().manual_seed(1), flip=False, crop=(8, 12))
    seen = set()
    for _ in range(6):
        batch = s.next()
        assert batch.shape == (7, 3, 8, 12) and batch.dtype == torch.uint8
        for crop in batch:
            hits = [(i, y, x) for i in range(5) for y in range(13) for x in range(19)
                    if torch.equal(images[i, :, y:y + 8, x:x + 12], crop)]
            assert hits, "a crop is not a window of any source image"
            seen.add(hits[0][1:])
    assert len(seen) > 10  # offsets vary over the whole valid range, not a fixed window


def test_sampler_crop_larger_than_images_is_refused():
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="crop 32x8 is larger than the images"):
        TrainSampler(images, 2, 0, crop=(32, 8))


def test_training_on_crops_keeps_the_full_resolution_model_and_thresholds():
    from fae_fast.train import train

    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.crop_size = (40, 56), (24, 24)
    cfg.train.steps, cfg.train.batch_size, cfg.train.holdout_fraction = 3, 4, 0.25
    images = torch.randint(0, 256, (8, 3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    res = train(cfg, images, device="cpu", progress=False)
    assert res.step == 3 and np.isfinite(res.thresholds["image"])
    with torch.no_grad():
        assert res.model(torch.rand(1, 3, 40, 56)).shape == (1, 3, 40, 56)


# ---------------------------------------------------------------------------------------------- Perlin base
def _components(mask: np.ndarray) -> int:
    import cv2

    n, _ = cv2.connectedComponents((mask > 0.5).astype(np.uint8))
    return n - 1


@pytest.mark.parametrize("base_max, envelope, coherent", [(4, 0.3, True), (32, 0.0, False)])
def test_perlin_blobs_are_coherent(base_max, envelope, coherent):
    """The default blob is one piece with ragged edges; the old behaviour (base octave drawn from every scale up
    to 32 cells, the top of a frame-wide field) shatters a mask into confetti."""
    cfg = CorruptionConfig(perlin_base_max=base_max, perlin_envelope=envelope, elastic_alpha=(0.0, 0.0),
                           soft_edge=0.0)
    cor = Corruptor(cfg, image_size=(112, 280))
    masks = cor.shapes.perlin(48, 112, 280, torch.Generator().manual_seed(0), "cpu")[:, 0].numpy()
    pieces = np.median([_components(m) for m in masks])
    coverage = np.mean([(m > 0.5).mean() for m in masks])
    assert abs(coverage - np.mean(cfg.perlin_coverage)) < 0.02  # the drawn coverage is kept either way
    assert (pieces <= 3) if coherent else (pieces > 20)


def test_perlin_base_max_is_validated():
    with pytest.raises(ValueError, match="perlin_base_max"):
        Corruptor(CorruptionConfig(perlin_base_max=0))


# ---------------------------------------------------------------------------------------------- same-eps backends
def test_noise_injection_and_loss_always_share_one_backend(monkeypatch):
    """A fallback of one of the two noise ops alone would draw different eps on the two sides: both fall back."""
    from fae_fast import _backend

    real = _backend.resolve

    def fake(op, backend, device):
        if op == "corrupt_and_noise":
            return "triton", None
        return real(op, backend, device)

    monkeypatch.setattr(_backend, "resolve", fake)
    assert ops.noise_backend("cpu") == "torch"
    monkeypatch.setattr(_backend, "resolve", lambda op, b, d: ("triton", None))
    assert ops.noise_backend("cpu") == "triton"


def test_training_uses_the_same_eps_tensor_on_both_sides(monkeypatch):
    """The eps added to the input is the eps in the target (compared as tensors, not as arguments)."""
    from fae_fast import reference
    from fae_fast.train import train

    drawn = {}
    real_in, real_loss = reference.corrupt_and_noise, reference.noisy_target_loss

    def spy_in(x, texture, mask, sigma, seed, noise=None, sample_offset=None):
        out = real_in(x, texture, mask, sigma, seed, noise=noise, sample_offset=sample_offset)
        clean = real_in(x, texture, mask, torch.zeros_like(sigma), seed, noise=noise, sample_offset=sample_offset)
        drawn.setdefault("in", []).append((out - clean).detach())
        return out

    def spy_loss(recon, x, sigma, seed, noise=None, sample_offset=None):
        target_eps = real_in(x, x, torch.zeros_like(x[:, :1], dtype=torch.float32), sigma, seed, noise=noise,
                             sample_offset=sample_offset) - x.float() / 255.0
        drawn.setdefault("tgt", []).append(target_eps.detach())
        return real_loss(recon, x, sigma, seed, noise=noise, sample_offset=sample_offset)

    monkeypatch.setattr(reference, "corrupt_and_noise", spy_in)
    monkeypatch.setattr(reference, "noisy_target_loss", spy_loss)
    monkeypatch.setenv("FAE_FAST_BACKEND", "torch")
    from fae_fast import _backend
    monkeypatch.setattr(_backend, "_cache", {})
    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.steps, cfg.train.batch_size = (32, 32), 2, 4
    cfg.noise.mode, cfg.noise.sigma_max = "symmetric", 0.1
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    train(cfg, images, device="cpu", progress=False)
    assert len(drawn["in"]) == len(drawn["tgt"]) == 2
    for a, b in zip(drawn["in"], drawn["tgt"]):
        assert a.abs().max() > 1e-3
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- normalisation
def test_zscore_normalisation_removes_a_systematic_hot_spot():
    g = torch.Generator().manual_seed(0)
    normal = torch.rand(20, 1, 16, 16, generator=g) * 0.1
    normal[:, :, :, :2] += 1.0                    # every normal image reconstructs the left edge badly
    test = torch.rand(2, 1, 16, 16, generator=g) * 0.1
    test[:, :, :, :2] += 1.0
    test[1, 0, 8, 8] += 0.6                       # a real defect, weaker than the hot edge
    raw_argmax = test[1].flatten().argmax().item()
    assert raw_argmax % 16 < 2                    # unnormalised, the edge wins
    stats = map_statistics(normal)
    for mode in ("mean", "zscore"):
        z = normalize_maps(test, stats, mode)
        assert z[1].flatten().argmax().item() == 8 * 16 + 8
        assert z[1].max() > 2 * z[0].max()
    assert normalize_maps(test, None, "none") is test
    with pytest.raises(ValueError, match="needs per-pixel statistics"):
        normalize_maps(test, None, "zscore")
    with pytest.raises(ValueError, match="at least 2"):
        map_statistics(normal[:1])


# ---------------------------------------------------------------------------------------------- progress
def test_progress_prints_an_eta_when_stderr_is_not_a_terminal(capsys):
    from fae_fast.train import train

    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.steps, cfg.train.batch_size = (32, 32), 3, 2
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    train(cfg, images, device="cpu", progress=True, log_every=1)
    err = capsys.readouterr().err
    assert "step 3/3 (100%)" in err and "ETA" in err


def test_defaults_do_not_flip():
    assert FAEConfig().train.augment_flip is False


def test_augment_shift_reaches_the_sampler():
    from fae_fast.train import train

    cfg = preset("tiny")
    cfg.train.steps, cfg.train.image_size, cfg.train.batch_size, cfg.train.augment_shift = 1, (32, 32), 2, 32
    assert FAEConfig().train.augment_shift == 0 == preset("cpu").train.augment_shift
    with pytest.raises(ValueError, match=r"shift must be an int in \[0, 32\) for 32 x 32 batches.*got 32"):
        train(cfg, torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), device="cpu")


# ---------------------------------------------------------------------------------------------- it learns
@pytest.mark.slow
def test_a_briefly_trained_fae_detects_synthetic_defects(tmp_path):
    """The FAE objective learns: 100 CPU steps on synthetic brushed metal detect holes, cracks, scratches, stains
    and contamination clearly better than chance (an untrained identity-like model scores 0.5; a broken objective,
    e.g. a target that is not the clean image, or masks that never reach the loss, falls well below these)."""
    from fae_fast.data import load_images, load_test_set, normal_image_paths
    from fae_fast.evaluate import evaluate
    from fae_fast.scoring import compute_maps
    from fae_fast.synthetic import make_dataset
    from fae_fast.train import train

    size = (48, 48)
    data = make_dataset(tmp_path / "d", n_train=60, n_test_good=10, n_test_defect=4, size=size, seed=3)
    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.steps, cfg.train.batch_size, cfg.train.lr = size, 100, 8, 3e-3
    res = train(cfg, load_images(normal_image_paths(data), size), device="cpu", progress=False)
    test = load_test_set(data, size)
    maps, scores = compute_maps(res.model, test.images, n=4, k=3)
    m = evaluate(scores.numpy(), maps[:, 0].numpy(), test.labels.numpy(), test.masks[:, 0].numpy())["overall"]
    assert m["pixel_auroc"] >= 0.88, m
    assert m["image_auroc"] >= 0.75, m
    assert m["pixel_aupro"] >= 0.55, m


# ---------------------------------------------------------------------------------------------- F1 thresholds
def test_calibrate_sets_the_f1_optimal_thresholds_from_labelled_data(tmp_path):
    from fae_fast import Detector
    from fae_fast.synthetic import make_dataset

    data = make_dataset(tmp_path / "d", n_train=12, n_test_good=4, n_test_defect=2, size=(32, 32), seed=1)
    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.batch_size = (32, 32), 4
    det = Detector(cfg, device="cpu").fit(data, steps=3, progress=False)
    before = dict(det.thresholds)
    res = det.calibrate(data)
    assert res["previous_thresholds"] == before
    assert det.thresholds == {"image": res["overall"]["image_f1_threshold"],
                              "pixel": res["overall"]["pixel_f1_threshold"]}
    # with those thresholds the image-level F1 on the same data is the F1max the metrics reported
    from fae_fast.data import load_test_set

    test = load_test_set(data, (32, 32))
    label = np.asarray(det.predict(test.images).pred_label, dtype=bool)
    y = test.labels.numpy().astype(bool)
    tp, fp, fn = int((label & y).sum()), int((label & ~y).sum()), int((~label & y).sum())
    assert abs(2 * tp / (2 * tp + fp + fn) - res["overall"]["image_f1max"]) < 1e-6
    det.save(tmp_path / "m.fae")
    assert Detector.load(tmp_path / "m.fae").thresholds == det.thresholds


def test_leave_one_out_normalisation_matches_statistics_without_the_image():
    from fae_fast.scoring import leave_one_out_normalized

    g = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 1, 5, 7, generator=g) ** 3
    for mode, window in (("mean", 1), ("zscore", 1), ("zscore", 3)):
        loo = leave_one_out_normalized(maps, mode, window)
        for i in range(6):
            rest = torch.cat([maps[:i], maps[i + 1:]])
            torch.testing.assert_close(loo[i:i + 1],
                                       normalize_maps(maps[i:i + 1], map_statistics(rest, window), mode),
                                       atol=1e-5, rtol=1e-4)


def test_leave_one_out_normalisation_with_a_pool_counts_the_pool_in_every_images_statistics():
    """``pool`` (``map.statistics`` "all": the training images' maps) joins each held-out map's statistics and is
    not normalised itself; working through a few maps at a time changes nothing."""
    from fae_fast.scoring import leave_one_out_normalized

    g = torch.Generator().manual_seed(1)
    maps, pool = torch.rand(5, 1, 5, 7, generator=g) ** 3, torch.rand(9, 1, 5, 7, generator=g) ** 2
    for mode, window in (("mean", 1), ("zscore", 1), ("zscore", 3)):
        loo = leave_one_out_normalized(maps, mode, window, pool=pool)
        assert loo.shape == maps.shape
        torch.testing.assert_close(leave_one_out_normalized(maps, mode, window, pool=pool, chunk=2), loo)
        for i in range(5):
            rest = torch.cat([pool, maps[:i], maps[i + 1:]])
            torch.testing.assert_close(loo[i:i + 1],
                                       normalize_maps(maps[i:i + 1], map_statistics(rest, window), mode),
                                       atol=1e-5, rtol=1e-4)
    assert leave_one_out_normalized(maps[:1], "zscore", pool=pool[:2]).shape == (1, 1, 5, 7)  # 3 images in all
    with pytest.raises(ValueError, match="at least 3 normal images, got 2"):
        leave_one_out_normalized(maps[:1], "zscore", pool=pool[:1])


def test_statistics_from_all_normal_images_keep_the_thresholds_held_out(tmp_path):
    """``map.statistics = "all"``: the per-pixel statistics come from the training images' maps and the held-out
    ones' together, the held-out images are scored (for the thresholds) by the statistics of every other normal
    image, and the ablation scores a run with the statistics its training stored."""
    from fae_fast.ablate import _run_scorer, load_data
    from fae_fast.config import smoothing_for_size
    from fae_fast.evaluate import evaluate
    from fae_fast.scoring import compute_maps
    from fae_fast.synthetic import make_dataset
    from fae_fast.train import split_holdout, train

    data = make_dataset(tmp_path / "d", n_train=16, n_test_good=3, n_test_defect=3, size=(32, 32), seed=2)
    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.steps, cfg.train.batch_size, cfg.train.holdout_fraction = (32, 32), 2, 4, 0.25
    cfg.map.normalize, cfg.map.statistics, cfg.model.residual = "zscore", "all", False  # maps far from 0
    _, images, test = load_data(data, cfg, log=lambda *a: None)
    res = train(cfg, images, device="cpu", progress=False)
    train_idx, hold_idx = split_holdout(len(images), 0.25, cfg.train.seed)
    n, k = smoothing_for_size(cfg.map, 32, 32)

    def maps_of(x):
        return compute_maps(res.model, x, n=n, k=k, error=cfg.map.error)[0]

    pool, hold = maps_of(images[train_idx]), maps_of(images[hold_idx])
    expect = map_statistics(torch.cat([pool, hold]))
    for key in ("mean", "scale"):
        torch.testing.assert_close(res.map_stats[key], expect[key])
        torch.testing.assert_close(map_statistics(hold, pool=pool)[key], expect[key], rtol=0, atol=0)
    assert not torch.allclose(expect["scale"], map_statistics(hold)["scale"], rtol=1e-2, atol=0)  # not held-out only
    assert len(res.holdout_scores) == len(hold_idx) == 4
    for i in range(len(hold)):
        rest = torch.cat([pool, hold[:i], hold[i + 1:]])
        torch.testing.assert_close(res.holdout_scores[i],
                                   normalize_maps(hold[i:i + 1], map_statistics(rest), "zscore").amax(),
                                   atol=1e-5, rtol=1e-4)
    setting = (n, k, cfg.map.error)
    got = _run_scorer(cfg, images, test, "cpu")(res.model, [setting], ["zscore"])[(*setting, "zscore")]
    test_maps = normalize_maps(maps_of(test.images), res.map_stats, "zscore")
    want = evaluate(test_maps.amax(dim=(1, 2, 3)).numpy(), test_maps[:, 0].numpy(), test.labels.numpy(),
                    test.masks[:, 0].numpy(), test.defect_types)
    for metric in ("image_auroc", "pixel_auroc"):
        assert got["overall"][metric] == pytest.approx(want["overall"][metric], abs=1e-6)
    assert preset("cpu").map.statistics == "all" and preset("default").map.statistics == "holdout"


def test_statistics_from_all_normal_images_cover_the_template_too(tmp_path):
    """``map.statistics = "all"`` with the fused score: the template's per-pixel statistics come from every normal
    image (it has no training, so the network's training images are as new to it as the held-out ones), its
    score's standardisation from the held-out images, each normalised by the statistics of all the others;
    "holdout" keeps the held-out images alone; the ablation scores a run as its training stored it."""
    import copy

    from fae_fast.ablate import _run_scorer, load_data
    from fae_fast.config import smoothing_for_size, template_passes
    from fae_fast.evaluate import evaluate
    from fae_fast.scoring import compute_maps, leave_one_out_normalized, template_maps
    from fae_fast.synthetic import make_dataset
    from fae_fast.train import split_holdout, train

    data = make_dataset(tmp_path / "d", n_train=16, n_test_good=3, n_test_defect=3, size=(32, 32), seed=2)
    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.steps, cfg.train.batch_size, cfg.train.holdout_fraction = (32, 32), 2, 4, 0.25
    cfg.map.normalize, cfg.map.image_score, cfg.map.template_weight = "zscore", "max+template", 0.5
    _, images, test = load_data(data, cfg, log=lambda *a: None)
    train_idx, hold_idx = split_holdout(len(images), 0.25, cfg.train.seed)
    n, k = smoothing_for_size(cfg.map, 32, 32)
    tn = template_passes(cfg.map.template_n, n)
    t_all = template_maps(images, n=tn, k=k, error=cfg.map.error)
    pool_t, hold_t = t_all[train_idx], t_all[hold_idx]
    runs = {}
    for statistics, want in (("all", map_statistics(torch.cat([pool_t, hold_t]))), ("holdout", map_statistics(hold_t))):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.map.statistics = statistics
        runs[statistics] = res = train(run_cfg, images, device="cpu", progress=False)
        for key in ("mean", "scale"):
            torch.testing.assert_close(res.map_stats["template_" + key], want[key])
    assert not torch.allclose(runs["all"].map_stats["template_scale"], runs["holdout"].map_stats["template_scale"],
                              rtol=1e-2, atol=0)
    loo = leave_one_out_normalized(hold_t, "zscore", pool=pool_t).amax(dim=(1, 2, 3))
    res = runs["all"]
    torch.testing.assert_close(res.map_stats["template_center"], loo.mean())
    torch.testing.assert_close(res.map_stats["template_spread"], loo.std())
    setting = (n, k, cfg.map.error)
    run_cfg = copy.deepcopy(cfg)
    run_cfg.map.statistics = "all"
    got = _run_scorer(run_cfg, images, test, "cpu")(res.model, [setting], ["zscore"])[(*setting, "zscore")]
    maps, scores = compute_maps(res.model, test.images, n=n, k=k, error=cfg.map.error, normalize="zscore",
                                stats=res.map_stats, image_score="max+template", template_n=cfg.map.template_n,
                                template_weight=0.5)
    want = evaluate(scores.numpy(), maps[:, 0].numpy(), test.labels.numpy(), test.masks[:, 0].numpy(),
                    test.defect_types)
    for metric in ("image_auroc", "pixel_auroc", "pixel_ap"):
        assert got["overall"][metric] == pytest.approx(want["overall"][metric], abs=1e-6)


def test_spread_window_covers_a_hot_spot_that_moves_between_parts():
    """A bright spot that sits a few pixels elsewhere on every normal part: with the spread max-filtered over a
    window wider than its jitter, the next part's spot at a new place is no longer an extreme z-score."""
    from fae_fast.config import FAEConfig
    from fae_fast.scoring import leave_one_out_normalized

    g = torch.Generator().manual_seed(1)
    maps = torch.rand(12, 1, 32, 32, generator=g) * 0.1
    for i in range(12):
        maps[i, 0, 14 + (i % 4), 10 + 2 * (i % 3)] += 5.0           # jitter of 3 rows and 4 columns
    new = torch.rand(1, 1, 32, 32, generator=g) * 0.1
    new[0, 0, 15, 13] += 5.0                                       # within the jitter, at a spot no part used
    own, wide = map_statistics(maps), map_statistics(maps, 7)
    assert normalize_maps(new, own, "zscore").max() > 10 * normalize_maps(new, wide, "zscore").max()
    assert normalize_maps(new, wide, "zscore").max() < 5.0
    assert torch.equal(map_statistics(maps, 1)["scale"], own["scale"])
    with pytest.raises(ValueError, match="spread window must be an odd int"):
        map_statistics(maps, 4)
    with pytest.raises(ValueError, match="spread window"):
        leave_one_out_normalized(maps, "zscore", 0)
    cfg = FAEConfig()
    cfg.map.spread_window = 6
    with pytest.raises(ValueError, match="map.spread_window must be odd"):
        cfg.validate()


def test_detector_with_zscore_maps_keeps_its_statistics_through_save_and_load(tmp_path):
    from fae_fast import Detector
    from fae_fast.synthetic import make_dataset

    data = make_dataset(tmp_path / "d", n_train=16, n_test_good=2, n_test_defect=1, size=(32, 32), seed=1)
    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.batch_size, cfg.train.holdout_fraction = (32, 32), 4, 0.25
    cfg.map.normalize = "zscore"
    cfg.model.residual = False  # errors of a realistic size after 2 steps (a residual head starts at the identity)
    det = Detector(cfg, device="cpu").fit(data, steps=2, progress=False)
    assert det.map_stats["mean"].shape == (1, 1, 32, 32)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    res = det.predict(images)
    raw = Detector(cfg, device="cpu")
    raw.model, raw.config = det.model, FAEConfig.from_dict({**cfg.to_dict(), "map": {**cfg.to_dict()["map"],
                                                                                     "normalize": "none"}})
    _, raw_maps, _ = raw.anomaly_maps(images)
    expect = normalize_maps(raw_maps, det.map_stats, "zscore")
    torch.testing.assert_close(torch.as_tensor(np.asarray(res.anomaly_map)), expect[:, 0])
    torch.testing.assert_close(torch.as_tensor(np.asarray(res.pred_score)), expect.amax(dim=(1, 2, 3)))
    det.save(tmp_path / "m.fae")
    back = Detector.load(tmp_path / "m.fae")
    torch.testing.assert_close(torch.as_tensor(np.asarray(back.predict(images).pred_score)),
                               torch.as_tensor(np.asarray(res.pred_score)))
    # the engine (PyTorch and, where installed, ONNX Runtime with the statistics inside the exported graph)
    # scores exactly like the detector
    from fae_fast.inference import Engine
    from fae_fast.inference import ort

    backends = ["torch"] + (["onnxruntime"] if ort.available() else [])
    for backend in backends:
        eng = Engine.from_model_file(tmp_path / "m.fae", device="cpu", backend=backend)
        got = eng.predict(images)
        torch.testing.assert_close(torch.as_tensor(np.asarray(got.pred_score)),
                                   torch.as_tensor(np.asarray(res.pred_score)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.as_tensor(np.asarray(got.anomaly_map)),
                                   torch.as_tensor(np.asarray(res.anomaly_map)), rtol=1e-4, atol=1e-5)
    det.map_stats = None
    with pytest.raises(ValueError, match="needs per-pixel statistics"):
        det.save(tmp_path / "bad.fae")


# ---------------------------------------------------------------------------------------------- noise scale
def test_noise_estimate_recovers_added_gaussian_noise_and_ignores_smooth_structure():
    from fae_fast.train import estimate_noise_std

    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 128), indexing="ij")
    smooth = (0.3 + 0.4 * torch.sin(3 * xx) * torch.cos(2 * yy))[None, None].expand(8, 3, 96, 128)
    for std in (0.0, 0.01, 0.04):
        noisy = (smooth + std * torch.randn(8, 1, 96, 128, generator=g)).clamp(0, 1)
        img = (noisy * 255).round().to(torch.uint8)
        est = estimate_noise_std(img)
        quant = 1 / 255 / 12 ** 0.5  # uint8 rounding noise
        assert abs(est - (std ** 2 + quant ** 2) ** 0.5) < 0.15 * std + 0.002, (std, est)


def test_sigma_relative_to_the_image_noise():
    from fae_fast.train import effective_sigma_max, estimate_noise_std

    cfg = preset("tiny")
    img = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg.noise.sigma_max = 0.05
    assert effective_sigma_max(cfg, img) == 0.05
    cfg.noise.sigma_reference, cfg.noise.sigma_max = "image_noise", 2.0
    assert effective_sigma_max(cfg, img) == pytest.approx(2.0 * estimate_noise_std(img))
    cfg.noise.sigma_reference = "bogus"
    with pytest.raises(ValueError, match="sigma_reference"):
        effective_sigma_max(cfg, img)


# ---------------------------------------------------------------------------------------------- CLI defaults
def test_auto_preset_follows_the_device():
    from fae_fast.config import resolve_preset

    assert resolve_preset("auto", "cpu") == "cpu"
    assert resolve_preset("auto", "cuda:0") == "default"
    assert resolve_preset("tiny", "cuda") == "tiny"
    assert preset("auto", "cpu").to_dict() == preset("cpu").to_dict()
    preset("cpu").validate()
    # the CPU recipe fuses the template into the image score (measured there); the GPU recipe is unmeasured
    assert preset("cpu").map.image_score == "max+template" and preset("default").map.image_score == "max"
    # the CPU recipe trains on the MSE plus 0.01 x (1 - SSIM) (measured there); the GPU recipe on DESIGN.md's MSE
    assert (preset("cpu").train.loss, preset("cpu").train.ssim_weight) == ("squared+ssim", 0.01)
    assert preset("cpu").map.template_n == 1 and preset("default").map.template_n is None
    # and mixes a tenth of the template's z-map into its pixel map; the GPU recipe's map stays the network's
    assert preset("cpu").map.template_weight == 0.1 and preset("default").map.template_weight == 0
    # and reads the template off frames at twice the network's size; the GPU recipe's frames are the network's
    assert preset("cpu").map.frame_scale == 2 and preset("default").map.frame_scale == 1
    assert preset("default").train.loss == "squared"


def test_train_cli_names_the_chosen_recipe_and_threads_in_its_first_line(tmp_path, capsys):
    import torch as _torch

    from fae_fast.cli import main
    from fae_fast.synthetic import make_dataset

    data = make_dataset(tmp_path / "d", n_train=8, n_test_good=2, n_test_defect=1, size=(32, 48), seed=0)
    threads = _torch.get_num_threads()
    try:
        rc = main(["train", "--data", str(data), "--out", str(tmp_path / "m.fae"), "--steps", "2", "--size", "32x48",
                   "--device", "cpu", "--threads", "1", "--quiet"])
    finally:
        _torch.set_num_threads(threads)
    assert rc == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("train: preset cpu (auto: no GPU)") and first.endswith(", 1 CPU thread")
    assert ("zscore normalisation (all normal images), image score max+template (template 1 pass, frames at 2x, 0.1 "
            "of the pixel map)") in first
    assert "squared+ssim (1 - SSIM x0.01) loss" in first
    assert "2 steps" in first and "size 32x48" in first


def test_calibrate_cli_writes_the_f1_thresholds(tmp_path, capsys):
    from fae_fast import Detector
    from fae_fast.cli import main
    from fae_fast.synthetic import make_dataset

    data = make_dataset(tmp_path / "d", n_train=8, n_test_good=3, n_test_defect=1, size=(32, 32), seed=0)
    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.batch_size = (32, 32), 4
    Detector(cfg, device="cpu").fit(data, steps=2, progress=False).save(tmp_path / "m.fae")
    rc = main(["calibrate", "--model", str(tmp_path / "m.fae"), "--data", str(data), "--out",
               str(tmp_path / "m2.fae"), "--device", "cpu"])
    assert rc == 0 and "F1-optimal" in capsys.readouterr().out
    det = Detector.load(tmp_path / "m2.fae")
    assert det.thresholds == Detector.load(tmp_path / "m.fae").calibrate(data)["thresholds"]


# ---------------------------------------------------------------------------------------------- training loss
def _loss_and_recon(x, loss, mode="none", **kwargs):
    """(batch_loss with ``loss``, the network output) for a fixed corruption and a fixed non-identity network."""
    from fae_fast.train import batch_loss

    seen = []

    def fwd(inp):
        out = inp * 0.7 + 0.1 * torch.roll(inp, 1, dims=3)
        seen.append(out.detach())
        return out

    cor = Corruptor(CorruptionConfig(), image_size=tuple(x.shape[2:]), device=x.device)
    value = batch_loss(fwd, x, cor, torch.Generator().manual_seed(5), step=0, seed=3, sigma_max=0.05, mode=mode,
                       noise_backend="torch", loss=loss, **kwargs)
    return value, seen[0]


@pytest.mark.parametrize("mode", ["none", "input"])
def test_gradient_loss_adds_the_maps_gradient_error_to_the_mse(mode):
    from fae_fast import reference
    from fae_fast.config import GRADIENT_WEIGHT

    x = torch.randint(0, 256, (3, 3, 24, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    sq, recon = _loss_and_recon(x, "squared", mode)
    both, recon2 = _loss_and_recon(x, "squared+gradient", mode)
    grad, _ = _loss_and_recon(x, "gradient", mode)
    torch.testing.assert_close(recon, recon2)          # the same corruption and noise whatever the loss
    clean = x.float() / 255
    expected = reference.error_image(clean, recon, "gradient").mean()
    torch.testing.assert_close(sq, (recon - clean).pow(2).mean())
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(both, sq + GRADIENT_WEIGHT * expected)
    assert grad > 1e-4
    ssim, recon3 = _loss_and_recon(x, "squared+ssim", mode)
    torch.testing.assert_close(recon, recon3)
    dis = reference.ssim_error(clean, recon).mean()
    torch.testing.assert_close(ssim, sq + dis)  # train.ssim_weight 1 by default
    torch.testing.assert_close(_loss_and_recon(x, "squared+ssim", mode, ssim_weight=0.25)[0], sq + 0.25 * dis)
    assert dis > 2 * sq  # the structural term is not negligible next to the MSE


def test_ssim_error_matches_a_direct_computation():
    """``reference.ssim_error``: 1 - SSIM per pixel, computed here pixel by pixel from its definition (Gaussian-
    weighted means, variances and covariance over the replicated border), channel mean; 0 for equal images."""
    import numpy as np

    from fae_fast import reference

    a = torch.rand(2, 3, 9, 13, generator=torch.Generator().manual_seed(0))
    b = (a + 0.2 * torch.rand(2, 3, 9, 13, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    got = reference.ssim_error(a, b)
    assert got.shape == (2, 1, 9, 13)
    r, s = 5, 1.5
    w = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * s * s))
    w2 = np.outer(w, w) / np.outer(w, w).sum()
    pa = np.pad(a.numpy(), ((0, 0), (0, 0), (r, r), (r, r)), mode="edge")
    pb = np.pad(b.numpy(), ((0, 0), (0, 0), (r, r), (r, r)), mode="edge")
    want = np.zeros((2, 3, 9, 13))
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    for i in range(9):
        for j in range(13):
            wa, wb = pa[:, :, i:i + 2 * r + 1, j:j + 2 * r + 1], pb[:, :, i:i + 2 * r + 1, j:j + 2 * r + 1]
            ma, mb = (wa * w2).sum((2, 3)), (wb * w2).sum((2, 3))
            va = (((wa - ma[..., None, None]) ** 2) * w2).sum((2, 3))
            vb = (((wb - mb[..., None, None]) ** 2) * w2).sum((2, 3))
            cv = ((wa - ma[..., None, None]) * (wb - mb[..., None, None]) * w2).sum((2, 3))
            want[:, :, i, j] = 1 - (2 * ma * mb + c1) * (2 * cv + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    torch.testing.assert_close(got, torch.from_numpy(want.mean(1, keepdims=True)).float(), atol=2e-5, rtol=1e-4)
    assert reference.ssim_error(a, a).abs().max() < 1e-5
    with pytest.raises(ValueError, match="loss must be one of"):
        reference.loss_image(a, b, "ssim")


@pytest.mark.parametrize("loss", ["squared", "squared+gradient", "squared+ssim"])
def test_occlusion_weight_counts_occluded_pixels_more(loss):
    """``train.occlusion_weight`` w: the per-pixel loss weighs 1 + w on the pixels the corruption touched, 1
    elsewhere; w = 0 is the plain loss; the corruption and the network's input do not depend on w."""
    from fae_fast import reference
    from fae_fast.train import batch_loss

    x = torch.randint(0, 256, (4, 3, 24, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cor = Corruptor(CorruptionConfig(p=1.0), image_size=(24, 40))
    mask = cor(x.float() / 255, torch.Generator().manual_seed(5)).mask_beta > 0
    assert 0 < mask.float().mean() < 0.9
    out, seen = {}, []
    for w in (0.0, 5.0):
        out[w] = batch_loss(lambda inp: seen.append(inp * 0.7 + 0.1) or seen[-1], x, cor,
                            torch.Generator().manual_seed(5), step=0, seed=3, sigma_max=0.0, mode="none",
                            noise_backend="torch", loss=loss, occlusion_weight=w)
    torch.testing.assert_close(seen[0], seen[1])
    err = reference.loss_image(x.float() / 255, seen[0], loss)
    torch.testing.assert_close(out[0.0], err.mean())
    torch.testing.assert_close(out[5.0], (err * (1 + 5 * mask.float())).mean())
    assert out[5.0] > 1.5 * out[0.0]
    cfg = preset("tiny")
    cfg.train.occlusion_weight = -1.0
    with pytest.raises(ValueError, match="train.occlusion_weight"):
        cfg.validate()
    cfg = preset("tiny")
    cfg.train.ssim_weight = -0.5
    with pytest.raises(ValueError, match="train.ssim_weight"):
        cfg.validate()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradient_loss_compares_with_the_same_noisy_target(backend):
    """No occlusion and a network that returns its input (x + eps): same-eps noise leaves nothing to learn in either
    term; input-only and independent noise do (the gradient term sees the target's own eps, drawn like the input's)."""
    from fae_fast.train import batch_loss

    if backend == "triton":
        pytest.importorskip("triton")
    x = torch.randint(0, 256, (2, 3, 16, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    cor = Corruptor(CorruptionConfig(p=0.0), image_size=(16, 24))
    out = {}
    for mode in ("symmetric", "input", "independent"):
        for loss in ("gradient", "squared+gradient"):
            out[mode, loss] = float(batch_loss(lambda inp: inp, x, cor, torch.Generator().manual_seed(5), step=1,
                                               seed=3, sigma_max=0.1, mode=mode, noise_backend=backend, loss=loss))
    assert out["symmetric", "gradient"] < 1e-10 and out["symmetric", "squared+gradient"] < 1e-10
    for mode in ("input", "independent"):
        assert out[mode, "gradient"] > 1e-5 and out[mode, "squared+gradient"] > out[mode, "gradient"]
    cfg = preset("tiny")
    cfg.train.loss = "ssim"
    with pytest.raises(ValueError, match="train.loss must be one of"):
        cfg.validate()


def test_training_optimises_the_configured_loss():
    """The first step's logged loss (zero-initialised residual head: recon = input) carries the gradient term."""
    from fae_fast.train import train

    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    first = {}
    for loss in ("squared", "squared+gradient", "squared+ssim"):
        cfg = preset("tiny")
        cfg.train.image_size, cfg.train.steps, cfg.train.batch_size, cfg.train.loss = (32, 32), 1, 4, loss
        cfg.map.normalize = "none"
        first[loss] = train(cfg, images, device="cpu", progress=False, log_every=1).history[0]["loss"]
    assert first["squared+gradient"] > 1.5 * first["squared"] > 0
    assert first["squared+ssim"] > 1.5 * first["squared"]


def test_network_view_is_the_rounded_area_mean_and_frame_map_repeats_it():
    """``map.frame_scale``'s two helpers: the network sees each s x s block's mean (rounded for uint8 frames, so
    its map is the usual one of a uint8 image), and its map comes back with each value on its block's pixels."""
    from fae_fast.scoring import frame_map, network_view

    x = torch.randint(0, 256, (2, 3, 8, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    blocks = x.float().reshape(2, 3, 4, 2, 6, 2).mean(dim=(3, 5))
    v = network_view(x, 2)
    assert v.dtype == torch.uint8 and v.shape == (2, 3, 4, 6)
    torch.testing.assert_close(v, blocks.round().to(torch.uint8))
    torch.testing.assert_close(network_view(x.float() / 255, 2), blocks / 255)
    assert network_view(x, 1) is x
    m = torch.rand(2, 1, 4, 6)
    big = frame_map(m, 2)
    assert big.shape == (2, 1, 8, 12)
    torch.testing.assert_close(big[:, :, ::2, ::2], m)
    torch.testing.assert_close(big[:, :, 1::2, 1::2], m)
    torch.testing.assert_close(big.amax(dim=(1, 2, 3)), m.amax(dim=(1, 2, 3)))


def test_frame_scale_template_reads_finer_frames_the_network_their_area_mean(tmp_path):
    """``map.frame_scale = 2``: frames at twice the network's size; the network trains and scores on their area
    mean (the same weights as training on that view directly), its z-map comes back on the frame's pixels, the
    template reads the frame, and the detector, the saved file and the engine (PyTorch and ONNX Runtime) score
    alike."""
    from fae_fast import Detector
    from fae_fast.config import frame_size
    from fae_fast.scoring import compute_maps, frame_map, network_view, template_maps
    from fae_fast.synthetic import make_dataset
    from fae_fast.train import train

    data = make_dataset(tmp_path / "d", n_train=16, n_test_good=2, n_test_defect=2, size=(64, 64), seed=1)
    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.batch_size, cfg.train.holdout_fraction = (32, 32), 4, 0.25
    cfg.map.normalize, cfg.map.image_score, cfg.map.template_n, cfg.map.frame_scale = "zscore", "max+template", 1, 2
    cfg.model.residual = False  # maps far from zero after two steps (a residual head starts as the identity)
    assert frame_size(cfg.map, (32, 32)) == (64, 64)
    assert "frames at 2x" in cfg.map.image_score_label()
    det = Detector(cfg, device="cpu").fit(data, steps=2, progress=False)
    assert det.image_size == (32, 32) and det.input_size == (64, 64)
    assert det.map_stats["mean"].shape == det.map_stats["template_mean"].shape == (1, 1, 64, 64)
    # the weights are those of training on the frames' view at the network's size
    from fae_fast.data import load_images, normal_image_paths

    frames = load_images(normal_image_paths(data), (64, 64))
    same = preset("tiny")
    same.train.image_size, same.train.batch_size, same.train.holdout_fraction = (32, 32), 4, 0.25
    same.train.steps, same.map.normalize, same.model.residual = 2, "none", False
    direct = train(same, network_view(frames, 2), device="cpu", progress=False).model.state_dict()
    for key, value in det.model.state_dict().items():
        torch.testing.assert_close(value, direct[key], msg=key)
    # new frames: the network's map of their view, replicated and z-scored; the fused score with the frame's template
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    res = det.predict(images)
    amap = torch.as_tensor(np.asarray(res.anomaly_map))
    assert amap.shape == (3, 64, 64)
    torch.testing.assert_close(amap[:, 1::2, 1::2], amap[:, ::2, ::2])  # one value per network pixel
    (n, k), st = det.smoothing, det.map_stats
    raw = frame_map(compute_maps(det.model, network_view(images, 2), n=n, k=k, error=cfg.map.error)[0], 2)
    net = normalize_maps(raw, st, "zscore")
    torch.testing.assert_close(amap, net[:, 0], rtol=1e-4, atol=1e-4)
    t = normalize_maps(template_maps(images, n=1, k=k, error=cfg.map.error),
                       {"mean": st["template_mean"], "scale": st["template_scale"]}, "zscore")
    expect = ((net.amax(dim=(1, 2, 3)) - st["score_center"]) / st["score_spread"]
              + (t.amax(dim=(1, 2, 3)) - st["template_center"]) / st["template_spread"]) / 2
    score = torch.as_tensor(np.asarray(res.pred_score))
    torch.testing.assert_close(score, expect, rtol=1e-4, atol=1e-4)
    # the same from the frames by compute_maps, from the saved file and from the engines
    maps, scores = compute_maps(det.model, images, n=n, k=k, error=cfg.map.error, normalize="zscore", stats=st,
                                image_score="max+template", template_n=1, frame_scale=2)
    torch.testing.assert_close(scores, expect, rtol=1e-4, atol=1e-4)
    det.save(tmp_path / "m.fae")
    back = Detector.load(tmp_path / "m.fae", device="cpu")
    assert back.input_size == (64, 64) and back.config.map.frame_scale == 2
    torch.testing.assert_close(torch.as_tensor(np.asarray(back.predict(images).pred_score)), score)
    assert set(det.evaluate(data)["overall"]) >= {"image_auroc", "pixel_auroc"}  # masks at the frame size
    from fae_fast.inference import Engine, ort

    for backend in ["torch"] + (["onnxruntime"] if ort.available() else []):
        eng = Engine.from_model_file(tmp_path / "m.fae", device="cpu", backend=backend)
        assert eng.image_size == (64, 64) and eng.frame_scale == 2
        got = eng.predict(images)
        torch.testing.assert_close(torch.as_tensor(np.asarray(got.pred_score)), score, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.as_tensor(np.asarray(got.anomaly_map)), amap, rtol=1e-4, atol=1e-4)
    if ort.available() and importlib.util.find_spec("onnx") is not None:
        import onnx

        from fae_fast.serving.triton_repo import export_triton_repo

        folder = export_triton_repo(tmp_path / "m.fae", tmp_path / "repo", name="frames")
        props = {p.key: p.value for p in onnx.load(str(folder / "1" / "model.onnx")).metadata_props}
        assert props["frame_scale"] == "2", props
    # only the template reads finer frames; 1..4; frames that are not a multiple are refused
    bad = preset("tiny")
    bad.map.frame_scale = 2
    with pytest.raises(ValueError, match="map.frame_scale 2 needs map.image_score 'max\\+template'"):
        bad.validate()
    bad.map.image_score, bad.map.frame_scale = "max+template", 5
    with pytest.raises(ValueError, match="map.frame_scale"):
        bad.validate()
    with pytest.raises(ValueError, match="frame_scale"):
        compute_maps(det.model, images[:, :, :63], n=n, k=k, frame_scale=2)


def test_template_fused_image_score_from_holdout_to_engine(tmp_path, monkeypatch):
    """``map.image_score = "max+template"``: the held-out normal images give the template's per-pixel statistics
    and the standardisation of both scores (computed here by hand from leave-one-out maps), the image threshold
    is read off the fused held-out scores, the maps stay the network's, and the detector, the saved file and the
    engine (PyTorch and ONNX Runtime) score alike. The template's map is smoothed by its own passes
    (``map.template_n`` = 1, the map's 4) everywhere."""
    from fae_fast import Detector
    from fae_fast.scoring import (TEMPLATE_KEYS, compute_maps, leave_one_out_normalized, template_maps,
                                  template_statistics, thresholds_from_holdout)
    from fae_fast.synthetic import make_dataset
    from fae_fast.train import holdout_thresholds

    data = make_dataset(tmp_path / "d", n_train=16, n_test_good=2, n_test_defect=1, size=(32, 32), seed=1)
    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.batch_size, cfg.train.holdout_fraction = (32, 32), 4, 0.25
    cfg.map.normalize, cfg.map.image_score, cfg.model.residual = "zscore", "max+template", False
    cfg.map.scale_with_size, cfg.map.k, cfg.map.template_n = False, 3, 1
    det = Detector(cfg, device="cpu").fit(data, steps=2, progress=False)
    assert set(TEMPLATE_KEYS) <= set(det.map_stats)
    # the holdout by hand: leave-one-out maxima of both maps, each standardised by its own mean and std
    hold = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    (n, k), tn = det.smoothing, 1
    assert (n, k) == (4, 3)
    thresholds, scores, _ = holdout_thresholds(det.model, det.config, hold, torch.device("cpu"))
    net = leave_one_out_normalized(compute_maps(det.model, hold, n=n, k=k, error=cfg.map.error)[0], "zscore")
    x = hold.float() / 255
    tm = ops.anomaly_map(x, x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous(), n=tn, k=k,
                         error=cfg.map.error, backend="torch")[0]
    torch.testing.assert_close(template_maps(hold, n=tn, k=k, error=cfg.map.error), tm)
    assert not torch.allclose(template_maps(hold, n=n, k=k, error=cfg.map.error), tm, rtol=1e-2, atol=1e-4)
    a, b = net.amax(dim=(1, 2, 3)), leave_one_out_normalized(tm, "zscore").amax(dim=(1, 2, 3))
    fused = ((a - a.mean()) / a.std() + (b - b.mean()) / b.std()) / 2
    torch.testing.assert_close(scores, fused, rtol=1e-5, atol=1e-5)
    assert thresholds == pytest.approx(thresholds_from_holdout(fused, net, cfg.train.threshold_quantile,
                                                               cfg.train.pixel_threshold_quantile), rel=1e-5)
    # template maps the caller already has (ablate: one setting, several normalisations) are used as given
    _, again, _ = template_statistics(hold, a, n=tn, k=k, error=cfg.map.error, mode="zscore", hold_templates=tm)
    torch.testing.assert_close(again, fused, rtol=1e-5, atol=1e-5)
    _, shuffled, _ = template_statistics(hold, a, n=tn, k=k, error=cfg.map.error, mode="zscore",
                                         hold_templates=tm.roll(1, 0))
    assert not torch.allclose(shuffled, fused, rtol=1e-3, atol=1e-3)
    # new images: the network's map, the fused score
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    res = det.predict(images)
    plain = Detector(cfg, device="cpu")
    plain.model, plain.map_stats = det.model, det.map_stats
    plain.config = FAEConfig.from_dict({**cfg.to_dict(), "map": {**cfg.to_dict()["map"], "image_score": "max"}})
    ref = plain.predict(images)
    torch.testing.assert_close(torch.as_tensor(np.asarray(res.anomaly_map)),
                               torch.as_tensor(np.asarray(ref.anomaly_map)))
    t = normalize_maps(template_maps(images, n=tn, k=k, error=cfg.map.error),
                       {"mean": det.map_stats["template_mean"], "scale": det.map_stats["template_scale"]}, "zscore")
    s_net = torch.as_tensor(np.asarray(ref.pred_score))
    expect = ((s_net - det.map_stats["score_center"]) / det.map_stats["score_spread"]
              + (t.amax(dim=(1, 2, 3)) - det.map_stats["template_center"]) / det.map_stats["template_spread"]) / 2
    torch.testing.assert_close(torch.as_tensor(np.asarray(res.pred_score)), expect, rtol=1e-5, atol=1e-5)
    det.save(tmp_path / "m.fae")
    assert Detector.load(tmp_path / "m.fae").config.map.image_score == "max+template"
    assert Detector.load(tmp_path / "m.fae").config.map.template_n == 1
    from fae_fast.inference import Engine, ort

    for backend in ["torch"] + (["onnxruntime"] if ort.available() else []):
        got = Engine.from_model_file(tmp_path / "m.fae", device="cpu", backend=backend).predict(images)
        torch.testing.assert_close(torch.as_tensor(np.asarray(got.pred_score)), expect, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.as_tensor(np.asarray(got.anomaly_map)),
                                   torch.as_tensor(np.asarray(res.anomaly_map)), rtol=1e-4, atol=1e-5)
    if ort.available() and importlib.util.find_spec("onnx") is not None:
        # the Triton model repository: its graph scores the same, its metadata names the template's passes
        import onnx
        import onnxruntime

        from fae_fast.serving.triton_repo import export_triton_repo

        folder = export_triton_repo(tmp_path / "m.fae", tmp_path / "repo", name="fused")
        props = {p.key: p.value for p in onnx.load(str(folder / "1" / "model.onnx")).metadata_props}
        assert props["image_score"] == "max+template" and props["template_passes"] == "1", props
        assert props["n"] == "4", props  # the map's own passes, unchanged
        sess = onnxruntime.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        score = sess.run(["pred_score"], {"images": images.numpy()})[0]
        torch.testing.assert_close(torch.as_tensor(score), expect, rtol=1e-4, atol=1e-5)
    # with the Triton map op (interpreted here) the template's map runs through it as well: the reference map is
    # never called, and the scores stay the same
    pytest.importorskip("triton")
    from fae_fast import reference

    def no_reference(*args, **kwargs):
        raise AssertionError("the engine's template map went through the reference, not its own map op")

    tri = Engine.from_model_file(tmp_path / "m.fae", device="cpu", backend="torch", map_backend="triton")
    monkeypatch.setattr(reference, "anomaly_map", no_reference)
    got = tri.predict(images[:1])  # one image: the interpreter runs every Triton program in Python
    torch.testing.assert_close(torch.as_tensor(np.asarray(got.pred_score)), expect[:1], rtol=1e-4, atol=1e-5)
    monkeypatch.undo()
    # a model file without the template's statistics is refused, naming what is missing
    for key in ("template_mean", "score_spread"):
        bad = dict(det.map_stats)
        del bad[key]
        det2 = Detector(cfg, device="cpu")
        det2.model, det2.map_stats, det2.thresholds = det.model, bad, det.thresholds
        with pytest.raises(ValueError, match="image score 'max\\+template' needs per-pixel statistics"):
            det2.save(tmp_path / "bad.fae")
    bad_cfg = preset("tiny")
    bad_cfg.map.normalize, bad_cfg.map.image_score = "none", "max+template"
    with pytest.raises(ValueError, match="map.image_score 'max\\+template' needs map.normalize"):
        bad_cfg.validate()
    bad_cfg.map.image_score = "mean"
    with pytest.raises(ValueError, match="map.image_score must be one of"):
        bad_cfg.validate()


def test_template_weight_mixes_the_template_into_the_pixel_map(tmp_path):
    """``map.template_weight`` w: the pixel map is (1 - w) x the network's z-map + w x the template's (normalised by
    its own statistics), the pixel threshold is read off the held-out images' leave-one-out maps mixed alike, the
    image score is the fused one of w = 0, and the detector, the saved file and the engines (PyTorch and ONNX
    Runtime) give the same maps."""
    from fae_fast import Detector
    from fae_fast.inference import Engine, ort
    from fae_fast.scoring import (compute_maps, leave_one_out_normalized, template_maps, template_statistics,
                                  thresholds_from_holdout)
    from fae_fast.synthetic import make_dataset
    from fae_fast.train import holdout_thresholds

    data = make_dataset(tmp_path / "d", n_train=16, n_test_good=2, n_test_defect=1, size=(32, 32), seed=1)
    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.batch_size, cfg.train.holdout_fraction = (32, 32), 4, 0.25
    cfg.map.normalize, cfg.map.image_score, cfg.model.residual = "zscore", "max+template", False
    cfg.map.scale_with_size, cfg.map.k, cfg.map.template_n, cfg.map.template_weight = False, 3, 1, 0.25
    assert "0.25 of the pixel map" in cfg.map.image_score_label()
    det = Detector(cfg, device="cpu").fit(data, steps=2, progress=False)
    (n, k), st, err = det.smoothing, det.map_stats, cfg.map.error
    # the holdout: the image threshold off the fused scores, the pixel threshold off the mixed maps
    hold = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    thresholds, scores, _ = holdout_thresholds(det.model, det.config, hold, torch.device("cpu"))
    net = leave_one_out_normalized(compute_maps(det.model, hold, n=n, k=k, error=err)[0], "zscore")
    tm = template_maps(hold, n=1, k=k, error=err)
    _, fused, t_loo = template_statistics(hold, net.amax(dim=(1, 2, 3)), n=1, k=k, error=err, mode="zscore")
    torch.testing.assert_close(t_loo, leave_one_out_normalized(tm, "zscore"))
    torch.testing.assert_close(scores, fused, rtol=1e-5, atol=1e-5)
    mixed = 0.75 * net + 0.25 * t_loo
    assert thresholds == pytest.approx(thresholds_from_holdout(fused, mixed, cfg.train.threshold_quantile,
                                                               cfg.train.pixel_threshold_quantile), rel=1e-5)
    assert thresholds["pixel"] != pytest.approx(thresholds_from_holdout(
        fused, net, cfg.train.threshold_quantile, cfg.train.pixel_threshold_quantile)["pixel"], rel=1e-3)
    # new images: the mixed map, the score of w = 0
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    res = det.predict(images)
    z_net = normalize_maps(compute_maps(det.model, images, n=n, k=k, error=err)[0], st, "zscore")
    z_t = normalize_maps(template_maps(images, n=1, k=k, error=err),
                         {"mean": st["template_mean"], "scale": st["template_scale"]}, "zscore")
    amap = torch.as_tensor(np.asarray(res.anomaly_map))
    torch.testing.assert_close(amap, (0.75 * z_net + 0.25 * z_t)[:, 0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(amap, z_net[:, 0], rtol=1e-2, atol=1e-3)
    unmixed = compute_maps(det.model, images, n=n, k=k, error=err, normalize="zscore", stats=st,
                           image_score="max+template", template_n=1)
    torch.testing.assert_close(torch.as_tensor(np.asarray(res.pred_score)), unmixed[1], rtol=1e-4, atol=1e-5)
    det.save(tmp_path / "m.fae")
    assert Detector.load(tmp_path / "m.fae").config.map.template_weight == 0.25
    for backend in ["torch"] + (["onnxruntime"] if ort.available() else []):
        got = Engine.from_model_file(tmp_path / "m.fae", device="cpu", backend=backend).predict(images)
        torch.testing.assert_close(torch.as_tensor(np.asarray(got.anomaly_map)), amap, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.as_tensor(np.asarray(got.pred_score)), unmixed[1], rtol=1e-4, atol=1e-5)
    # the image score "max" has no template: the weight is unused, the map the network's (as at w = 0)
    plain = Detector(cfg, device="cpu")
    plain.model, plain.map_stats = det.model, det.map_stats
    plain.config = FAEConfig.from_dict({**cfg.to_dict(), "map": {**cfg.to_dict()["map"], "image_score": "max"}})
    assert "pixel map" not in plain.config.map.image_score_label()
    torch.testing.assert_close(torch.as_tensor(np.asarray(plain.predict(images).anomaly_map)), z_net[:, 0],
                               rtol=1e-4, atol=1e-5)
    # w in [0, 1]
    bad = preset("tiny")
    bad.map.template_weight = 1.5
    with pytest.raises(ValueError, match=r"map\.template_weight must be in \[0, 1\], got 1.5"):
        bad.validate()
    with pytest.raises(ValueError, match=r"template_weight .* must be in \[0, 1\], got -0.1"):
        Engine(det.model, image_size=(32, 32), device="cpu", template_weight=-0.1)


def test_training_passes_the_spread_window_to_the_statistics_and_thresholds(monkeypatch):
    from fae_fast import scoring
    from fae_fast.train import train

    seen = []
    real_stats, real_loo = scoring.map_statistics, scoring.leave_one_out_normalized
    monkeypatch.setattr(scoring, "map_statistics",
                        lambda m, w=1, **kw: seen.append(("stats", w)) or real_stats(m, w, **kw))
    monkeypatch.setattr(scoring, "leave_one_out_normalized",
                        lambda m, mode, w=1, **kw: seen.append(("loo", w)) or real_loo(m, mode, w, **kw))
    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.steps, cfg.train.batch_size, cfg.map.spread_window = (32, 32), 1, 4, 5
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    res = train(cfg, images, holdout=images[:4], device="cpu", progress=False)
    assert seen == [("stats", 5), ("loo", 5)] and res.map_stats is not None

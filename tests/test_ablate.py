"""A tiny ablation end to end (two variants, few steps, synthetic data): the command runs and its table is sane."""
import json

import pytest
import torch

from fae_fast.ablate import METRICS, VARIANTS, describe, markdown_table, smoothing_grid, variant_config
from fae_fast.cli import main
from fae_fast.config import MAP_ERRORS, preset
from fae_fast.synthetic import make_dataset


def test_variant_configs_change_only_what_they_name():
    base = preset("tiny")
    assert variant_config(base, "fae", 3).noise.mode == base.noise.mode
    assert variant_config(base, "no_noise", 0).noise.mode == "none"
    assert variant_config(base, "same_noise", 0).noise.mode == "symmetric"
    assert variant_config(base, "independent_noise", 0).noise.mode == "independent"
    ae = variant_config(base, "plain_ae", 0)
    assert ae.corruption.p == 0.0 and ae.noise.mode == "none"
    assert ae.model.skip_mode == "none" and not ae.model.gated_skips and not ae.model.residual
    op = variant_config(base, "opaque", 0)
    assert op.corruption.beta_min == op.corruption.beta_max == 1.0
    assert variant_config(base, "no_thin_strokes", 0).corruption.w_stroke == 0.0
    assert variant_config(base, "residual_head", 0).model.residual is True
    assert variant_config(base, "plain_head", 0).model.residual is False
    assert variant_config(base, "ssim_loss", 0).train.loss == "squared+ssim"
    cpu = preset("cpu")
    assert (cpu.train.loss, variant_config(cpu, "mse_loss", 0).train.loss) == ("squared+ssim", "squared")
    assert variant_config(base, "fae", 3).train.seed == 3
    assert base.to_dict() == preset("tiny").to_dict()  # base untouched
    assert set(VARIANTS) >= {"fae", "no_noise", "input_noise", "independent_noise", "plain_ae"}


def test_label_names_the_shift_and_the_crops():
    cfg = preset("tiny")
    assert "shift" not in describe(cfg) and "crops" not in describe(cfg)
    cfg.train.augment_shift, cfg.train.crop_size = 4, (64, 96)
    assert describe(cfg).endswith(", crops 64x96, shifts up to 4 px")


def test_plain_ae_is_not_the_identity():
    """The fair plain AE has no skips and no residual head: it cannot copy its input (the old one was exactly
    the identity, with zero loss and zero gradient from step 0)."""
    import torch

    from fae_fast.models import build_model

    cfg = variant_config(preset("tiny"), "plain_ae", 0)
    net = build_model(cfg.model).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert (net(x) - x).abs().mean() > 0.05


def test_overrides_set_any_key_and_name_unknown_ones():
    import pytest

    from fae_fast.ablate import apply_overrides

    cfg = apply_overrides(preset("tiny"), ["train.crop_size=32x48", "noise.sigma_max=0.02", "model.residual=false",
                                            "noise.mode=none"])
    assert cfg.train.crop_size == (32, 48) and cfg.noise.sigma_max == 0.02 and cfg.model.residual is False
    assert cfg.noise.mode == "none"
    with pytest.raises(ValueError, match="unknown config key 'train.nope'"):
        apply_overrides(preset("tiny"), ["train.nope=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides(preset("tiny"), ["steps=3"])


def test_smoothing_grid_holds_the_default_and_valid_windows():
    grid = smoothing_grid(4, 7)
    assert (4, 7) in grid and (0, 1) in grid
    assert all(k % 2 == 1 and 1 <= k <= 31 and 0 <= n <= 8 for n, k in grid)


def test_tiny_ablation_end_to_end(tmp_path, capsys):
    data = make_dataset(tmp_path / "d", n_train=20, n_test_good=3, n_test_defect=2, size=(32, 32), seed=2)
    out, models = tmp_path / "ablation.json", tmp_path / "models"
    rc = main(["ablate", "--data", str(data), "--variants", "fae,same_noise,plain_ae", "--seeds", "0", "--steps", "4",
               "--size", "32", "--preset", "tiny", "--batch-size", "4", "--device", "cpu", "--json", str(out),
               "--eval-every", "2", "--save-models", str(models), "--set", "train.crop_size=24x24",
               "--set", "train.holdout_fraction=0.2", "--plot", str(tmp_path / "curves.svg")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [(r["variant"], r["seed"]) for r in res["runs"]] == [("fae", 0), ("same_noise", 0), ("plain_ae", 0)]
    by = {r["variant"]: r for r in res["runs"]}
    # each run carries the config it really trained with, and its label says so
    assert by["same_noise"]["config"]["noise"]["mode"] == "symmetric" and "symmetric" in by["same_noise"]["label"]
    assert by["fae"]["config"]["noise"]["mode"] == "none" and "noise none" in by["fae"]["label"]
    assert by["fae"]["config"]["train"]["crop_size"] == [24, 24]
    # learning curve at steps 2 and 4; per-defect rows; the commit and the machine named
    assert [pt["step"] for pt in by["fae"]["curve"]] == [2, 4]
    assert by["fae"]["curve"][-1]["pixel_auroc"] == by["fae"]["pixel_auroc"]
    types = set(by["fae"]["per_defect"])
    assert types and types == set(res["summary"]["fae"]["per_defect"])
    assert "commit" in res and res["machine"]["node"]
    # the scoring sweep: every smoothing setting with every error kind and normalisation (the holdout has 4 images)
    n_settings = len(smoothing_grid(*res["smoothing_default"]))
    assert sum(k.startswith("fae|") for k in res["scoring"]) == len(MAP_ERRORS) * 3 * n_settings
    assert {k.split(",")[2] for k in res["scoring"]} == set(MAP_ERRORS)
    assert sorted(p.name for p in models.iterdir()) == ["fae_seed0.fae", "plain_ae_seed0.fae", "same_noise_seed0.fae"]
    table = markdown_table(res)
    assert "| fae (n=1) |" in table and "Learning curves" in table and "zscore" in table
    machine = res["machine"]
    assert table.splitlines()[0].startswith(f"Commit {res['commit']}, {machine['node']} ({machine['cpu']}), ")
    assert "plain_ae" in capsys.readouterr().out
    svg = (tmp_path / "curves.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 3 * 3  # 3 variants x 3 metrics
    # the saved models, scored again without training, give the same rows and the same sweep
    again = tmp_path / "again.json"
    assert main(["ablate", "--data", str(data), "--device", "cpu", "--json", str(again),
                 "--score-models", *sorted(str(p) for p in models.iterdir())]) == 0
    res2 = json.loads(again.read_text())
    by2 = {r["variant"]: r for r in res2["runs"]}
    assert set(by2) == set(by) and by2["same_noise"]["config"] == by["same_noise"]["config"]
    same = pytest.approx  # the trained and the reloaded network differ in memory layout: float rounding only
    for v in by:
        assert {m: by2[v][m] for m in METRICS} == same({m: by[v][m] for m in METRICS}, abs=1e-4), v
        assert by2[v]["train_seconds"] is None and by2[v]["curve"] == []
    assert set(res2["scoring_runs"]) == set(res["scoring_runs"]) and res2["image_size"] == res["image_size"]
    for key, rows in res["scoring_runs"].items():
        assert [r["pixel_aupro"] for r in res2["scoring_runs"][key]] == same([r["pixel_aupro"] for r in rows],
                                                                            abs=1e-4), key


def test_a_weight_average_run_also_scores_its_live_weights(tmp_path):
    data = make_dataset(tmp_path / "d", n_train=12, n_test_good=2, n_test_defect=2, size=(32, 32), seed=3)
    out = tmp_path / "ablation.json"
    assert main(["ablate", "--data", str(data), "--variants", "fae", "--seeds", "0", "--steps", "3", "--size", "32",
                 "--preset", "tiny", "--batch-size", "4", "--device", "cpu", "--json", str(out), "--no-sweep",
                 "--set", "train.ema_decay=0.5", "--set", "train.holdout_fraction=0.25"]) == 0
    res = json.loads(out.read_text())
    n, k = res["smoothing_default"]
    setting = f"n={n},k={k},{res['error_default']},{res['normalize_default']}"
    assert set(res["scoring"]) == {f"fae|{setting}", f"fae|live weights,{setting}"}


def test_map_error_exploration_rescores_saved_models(tmp_path):
    from bench.explore_map_errors import main as explore
    from fae_fast.api import Detector
    from fae_fast.config import preset

    data = make_dataset(tmp_path / "d", n_train=12, n_test_good=2, n_test_defect=1, size=(32, 32), seed=4)
    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.steps, cfg.train.batch_size, cfg.train.holdout_fraction = (32, 32), 2, 4, 0.25
    Detector(cfg, device="cpu").fit(data / "train" / "good", progress=False).save(tmp_path / "m.fae")
    assert explore(["--data", str(data), "--models", str(tmp_path / "m.fae"), "--weights", "4",
                    "--json", str(tmp_path / "x.json")]) == 0
    res = json.loads((tmp_path / "x.json").read_text())
    assert [r["kind"] for r in res["rows"]] == ["squared", "gradient", "squared+4xgradient"]
    assert res["commit"] and all(0.0 <= r["pixel_auroc"] <= 1.0 and r["per_defect"] for r in res["rows"])
    # the product's kind (squared+gradient, z-scored) scores as `ablate --score-models` scores the model: the same
    # data, the same held-out statistics
    assert main(["ablate", "--data", str(data), "--score-models", str(tmp_path / "m.fae"), "--no-sweep",
                 "--device", "cpu", "--json", str(tmp_path / "a.json")]) == 0
    run = json.loads((tmp_path / "a.json").read_text())["runs"][0]
    for m in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert res["rows"][2][m] == pytest.approx(run[m], abs=1e-4), m


def test_scoring_probes_rescore_saved_models_as_the_product_does_unless_they_change_it(tmp_path, monkeypatch):
    from bench import explore_scoring
    from fae_fast import ablate, reference, scoring
    from fae_fast.api import Detector

    for module, name in ((reference, "error_image"), (scoring, "_template_map"), (scoring, "fuse_scores"),
                         (scoring, "template_statistics"), (scoring, "template_fused"), (scoring, "normalize_maps"),
                         (scoring, "leave_one_out_normalized"), (ablate, "_run_scorer")):
        monkeypatch.setattr(module, name, getattr(module, name))  # every probe's patch is undone after the test
    data = make_dataset(tmp_path / "d", n_train=12, n_test_good=3, n_test_defect=3, size=(32, 32), seed=4)
    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.steps, cfg.train.batch_size, cfg.train.holdout_fraction = (32, 32), 2, 4, 0.25
    cfg.map.image_score = "max+template"
    Detector(cfg, device="cpu").fit(data / "train" / "good", progress=False).save(tmp_path / "m.fae")

    def probe(name):
        out = tmp_path / f"{name.replace(':', '_')}.json"
        assert explore_scoring.main(["--probe", name, "--data", str(data), "--models", str(tmp_path / "m.fae"),
                                     "--json", str(out)]) == 0
        res = json.loads(out.read_text())
        return res["probe"], {m: res["runs"][0][m] for m in ("image_auroc", "pixel_auroc", "pixel_aupro")}

    assert main(["ablate", "--data", str(data), "--score-models", str(tmp_path / "m.fae"), "--no-sweep",
                 "--threads", "1", "--json", str(tmp_path / "a.json")]) == 0  # the probes' thread count
    product = {m: json.loads((tmp_path / "a.json").read_text())["runs"][0][m]
               for m in ("image_auroc", "pixel_auroc", "pixel_aupro")}
    # the fusion's own mean, named as a probe: the product's digits; each probe's definition is its own bullet
    named, digits = probe("fusion:0.5")
    assert digits == pytest.approx(product, abs=1e-9)
    assert named["name"] == "fusion:0.5" and named["definition"].startswith("``fusion:W``")
    assert probe("fusion:max")[0]["definition"].startswith("``fusion:max``")
    # the network's share alone scores as the product's plain max does; the maps do not move with the fusion
    net_only = probe("fusion:0")[1]
    assert main(["ablate", "--data", str(data), "--score-models", str(tmp_path / "m.fae"), "--no-sweep",
                 "--threads", "1", "--set", "map.image_score=max", "--json", str(tmp_path / "max.json")]) == 0
    plain_max = json.loads((tmp_path / "max.json").read_text())["runs"][0]
    assert net_only == pytest.approx({m: plain_max[m] for m in net_only}, abs=1e-9)
    stats = {"score_center": torch.tensor(1.0), "score_spread": torch.tensor(2.0),
             "template_center": torch.tensor(0.0), "template_spread": torch.tensor(4.0)}
    explore_scoring.apply_probe("fusion:0.25")
    fused = scoring.fuse_scores(torch.tensor([5.0]), torch.tensor([8.0]), stats).item()
    assert fused == pytest.approx(0.75 * (5 - 1) / 2 + 0.25 * 8 / 4)
    explore_scoring.apply_probe("fusion:max")
    assert scoring.fuse_scores(torch.tensor([5.0]), torch.tensor([16.0]), stats).item() == pytest.approx(4.0)
    # the template against each image's local mean: a shading ramp is normal, a dark dot is not
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32).contiguous()
    dot = ramp.clone()
    dot[..., 16, 16] = 0.0
    assert scoring._template_map(ramp, 0, 1, "squared")[..., 8:-8, 8:-8].max() > 0.01
    explore_scoring.apply_probe("template_local:5")
    assert scoring._template_map(ramp, 0, 1, "squared")[..., 8:-8, 8:-8].max() < 1e-10
    assert scoring._template_map(dot, 0, 1, "squared")[0, 0, 16, 16] > 0.1
    # the standardisations by median and MAD
    hold = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    loo = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    explore_scoring.apply_probe("fusion_robust")
    extra = scoring.template_statistics(hold, loo, n=1, k=3, error="squared", mode="zscore")[0]
    assert extra["score_center"].item() == 3.0 and extra["score_spread"].item() == pytest.approx(1.4826)
    # shift-tolerant z-scores: an edge one pixel from where normal maps put it matches their statistics there
    normal = torch.zeros(4, 1, 8, 8)
    normal[..., 3] = 1.0
    normal += 0.01 * torch.arange(4.0).view(4, 1, 1, 1)
    moved = torch.zeros(1, 1, 8, 8)
    moved[..., 4] = 1.0
    stats = scoring.map_statistics(normal)
    stats.update({"template_mean": stats["mean"], "template_scale": stats["scale"], "score_center": torch.tensor(0.0),
                  "score_spread": torch.tensor(1.0), "template_center": torch.tensor(0.0),
                  "template_spread": torch.tensor(1.0)})
    product_loo = scoring.leave_one_out_normalized(torch.cat([normal, moved]), "zscore")
    assert scoring.normalize_maps(moved, stats, "zscore").max() > 10 and product_loo[4].max() > 10
    explore_scoring.apply_probe("template_shift:1")  # the template's z-score only
    assert scoring.normalize_maps(moved, stats, "zscore").max() > 10
    assert scoring.template_fused(moved, moved.amax(dim=(1, 2, 3)), moved, stats, "zscore", 1.0)[0].max() < 1
    explore_scoring.apply_probe("shift:1")
    assert scoring.normalize_maps(moved, stats, "zscore").max() < 1
    shifted_loo = scoring.leave_one_out_normalized(torch.cat([normal, moved]), "zscore")
    assert shifted_loo[4].max() < 1 and torch.all(shifted_loo[:4] <= product_loo[:4] + 1e-6)
    # the template as a line detector: a dark line adds up along its length, a dot as dark does not
    assert probe("template_lines:9")[0]["definition"].startswith("``template_lines:L``")  # its map stays patched
    grain = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    line, dot = grain.clone(), grain.clone()
    line[..., 16, 8:24] = 64
    dot[..., 16, 16] = 64
    lmap, dmap = scoring._template_map(line, 1, 3, "squared"), scoring._template_map(dot, 1, 3, "squared")
    assert lmap.shape == (1, 1, 32, 32) and lmap[0, 0, 16, 16] > 4 * dmap[0, 0, 16, 16] > 0
    # BatchNorm statistics estimated again: a cumulative average over the batches, the model left in eval mode
    bn_model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    imgs = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    assert explore_scoring.recalibrate_batchnorm(bn_model, imgs, batch_size=4) == 1 and not bn_model.training
    x = imgs.float() / 255.0
    assert torch.allclose(bn_model[0].running_mean, x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert bn_model[0].momentum == 0.1 and bn_model[0].num_batches_tracked.item() == 4
    recal = probe("bn_recalibrate")
    assert recal[0]["definition"].startswith("``bn_recalibrate``") and 0 <= recal[1]["image_auroc"] <= 1
    # a second scale changes the maps
    assert probe("multiscale:1,2")[1]["pixel_auroc"] != pytest.approx(product["pixel_auroc"], abs=1e-6)
    with pytest.raises(SystemExit, match="unknown probe 'blur'"):
        explore_scoring.apply_probe("blur")


def _part(variant, seeds, sweep_rows=()):
    runs = [{"variant": variant, "seed": s, **{m: 0.5 + 0.1 * s for m in
                                               ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap",
                                                "image_f1max")}} for s in seeds]
    return {"dataset": "/d", "image_size": [32, 32], "steps": 5, "smoothing_default": [4, 3], "seeds": list(seeds),
            "config": {"model": {"widths": [16, 32]}}, "commit": "abc",
            "seconds": 1.0, "runs": runs, "scoring_runs": {"fae|n=4,k=3,squared,none": list(sweep_rows)}}


def test_merge_recomputes_mean_and_std_over_all_parts():
    import pytest

    from fae_fast.ablate import merge_results

    a, b = _part("fae", [0, 1]), _part("plain_ae", [0, 1, 2])
    merged = merge_results([a, b])
    assert [r["variant"] for r in merged["runs"]] == ["fae"] * 2 + ["plain_ae"] * 3
    s = merged["summary"]["plain_ae"]["pixel_auroc"]
    assert s["n"] == 3 and abs(s["mean"] - 0.6) < 1e-12 and abs(s["std"] - 0.1) < 1e-12
    assert merged["seconds"] == 2.0
    c = _part("opaque", [0])
    c["steps"] = 6
    with pytest.raises(ValueError, match="different steps"):
        merge_results([a, c])
    with pytest.raises(ValueError, match="repeat runs"):
        merge_results([a, _part("fae", [1])])
    d = _part("opaque", [0])
    d["config"] = {"model": {"widths": [8, 16]}}
    with pytest.raises(ValueError, match="different config"):
        merge_results([a, d])
    # parts of `--score-models` carry their first model's config, its training seed included: runs name theirs
    f, g = _part("fae", [1]), _part("fae", [2])
    f["config"]["train"], g["config"]["train"] = {"seed": 1, "steps": 5}, {"seed": 2, "steps": 5}
    assert [r["seed"] for r in merge_results([f, g])["runs"]] == [1, 2]
    g["config"]["train"]["steps"] = 6
    with pytest.raises(ValueError, match="different config"):
        merge_results([f, g])
    e = _part("opaque", [0])
    e["commit"] = "def"
    with pytest.raises(ValueError, match="different commit"):  # comparisons run on one commit
        merge_results([a, e])


def test_score_models_refuses_models_scored_differently(tmp_path, capsys):
    from fae_fast.api import Detector

    data = make_dataset(tmp_path / "d", n_train=8, n_test_good=2, n_test_defect=1, size=(32, 32), seed=5)
    paths = []
    for k in (3, 5):
        cfg = preset("tiny")
        cfg.train.image_size, cfg.train.steps, cfg.train.batch_size, cfg.train.holdout_fraction = (32, 32), 1, 4, 0.25
        cfg.map.k = k
        paths.append(tmp_path / f"fae_k{k}_seed0.fae")
        Detector(cfg, device="cpu").fit(data / "train" / "good", progress=False).save(paths[-1])
    assert main(["ablate", "--data", str(data), "--device", "cpu", "--score-models", *map(str, paths)]) == 2
    assert f"{paths[1]}: map settings" in capsys.readouterr().err


def test_score_models_with_scoring_overrides(tmp_path, capsys):
    """``--set`` with ``--score-models`` changes how saved models are scored (here: inpainting hidden cells) and
    is recorded in each run's config; training keys are refused."""
    from fae_fast.api import Detector

    data = make_dataset(tmp_path / "d", n_train=8, n_test_good=2, n_test_defect=2, size=(32, 32), seed=5)
    cfg = preset("tiny")
    cfg.train.image_size, cfg.train.steps, cfg.train.batch_size, cfg.train.holdout_fraction = (32, 32), 2, 4, 0.4
    path = tmp_path / "fae_seed0.fae"
    Detector(cfg, device="cpu").fit(data / "train" / "good", progress=False).save(path)
    res = {}
    for name, sets in (("plain", []), ("cells", ["--set", "model.hide_cell=4"]),
                       ("fused", ["--set", "map.image_score=max+template"]),
                       ("frames", ["--set", "map.image_score=max+template", "--set", "map.frame_scale=2"])):
        out = tmp_path / f"{name}.json"
        assert main(["ablate", "--data", str(data), "--device", "cpu", "--no-sweep", "--json", str(out), *sets,
                     "--score-models", str(path)]) == 0
        res[name] = json.loads(out.read_text())["runs"][0]
    assert res["plain"]["config"]["model"]["hide_cell"] == 0 and res["cells"]["config"]["model"]["hide_cell"] == 4
    assert res["plain"]["pixel_auroc"] != res["cells"]["pixel_auroc"]
    # the fused image score changes the image ranking only: the maps (pixel metrics) stay the plain ones
    assert res["fused"]["config"]["map"]["image_score"] == "max+template"
    assert res["fused"]["pixel_auroc"] == res["plain"]["pixel_auroc"]
    assert res["fused"]["image_auroc"] != res["plain"]["image_auroc"]
    # the template on frames read at twice the size (the network on their area mean)
    assert res["frames"]["config"]["map"]["frame_scale"] == 2
    assert "test images at 64x64" in capsys.readouterr().out
    assert 0 <= res["frames"]["image_auroc"] <= 1 and res["frames"]["image_auroc"] != res["fused"]["image_auroc"]
    from fae_fast.ablate import maps_for_settings
    from fae_fast.scoring import compute_maps

    model = Detector.load(path, device="cpu").model
    frames = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = maps_for_settings(model, frames, [(2, 3, "squared")], frame_scale=2)[(2, 3, "squared")]
    want = compute_maps(model, frames, n=2, k=3, error="squared", frame_scale=2)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert main(["ablate", "--data", str(data), "--device", "cpu", "--set", "train.steps=5",
                 "--score-models", str(path)]) == 2
    assert "changes only the scoring" in capsys.readouterr().err


def test_template_baseline_trains_nothing_and_detects_synthetic_defects(tmp_path):
    """``template``: no network (each pixel's reconstruction is its image's mean), scored like a trained model by
    the held-out normal images' per-pixel statistics; it saves no model and still finds the synthetic defects
    (a map that ignored the image, or statistics that cancelled it, would score about 0.5)."""
    import torch

    from fae_fast.ablate import NO_NETWORK, ImageMean, apply_overrides, run_ablation

    x = torch.rand(2, 3, 5, 7)
    assert torch.equal(ImageMean()(x), x.mean(dim=(2, 3), keepdim=True).expand_as(x))
    assert set(NO_NETWORK) <= set(VARIANTS)
    data = make_dataset(tmp_path / "d", n_train=24, n_test_good=6, n_test_defect=6, size=(48, 48), seed=2)
    base = apply_overrides(preset("tiny"), ["train.image_size=48x48", "train.holdout_fraction=0.25"])
    res = run_ablation(data, variants=("template",), seeds=(0,), base=base, device="cpu", sweep=False,
                       save_models=tmp_path / "models", log=lambda *a: None)
    (run,) = res["runs"]
    assert run["train_seconds"] == 0.0 and run["final_loss"] is None and "no network" in run["label"]
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
    assert run["image_auroc"] >= 0.75 and run["pixel_auroc"] >= 0.85, run


def test_result_files_name_the_cpu_model(monkeypatch, tmp_path):
    """Two VMs with the same node name and core count trained the recipe to different digits: a result file names
    the CPU model (from /proc/cpuinfo on Linux), and where there is none the platform's processor or architecture."""
    import builtins
    import platform

    from bench._common import machine_info as bench_machine_info
    from fae_fast.ablate import cpu_model, machine_info
    from fae_fast.inference.bench import machine_info as engine_bench_machine_info

    info = machine_info("cpu")
    assert info["cpu"] == cpu_model() and isinstance(info["cpu"], str) and info["cpu"]
    # the benchmarks' records name the same CPU (pytest-benchmark's extra_info, `fae-fast bench`)
    assert bench_machine_info()["cpu"] == engine_bench_machine_info("cpu")["cpu"] == info["cpu"]
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nvendor_id\t: Example\nmodel name\t: Example CPU 9000 @ 3.0GHz\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open",
                        lambda f, *a, **kw: real_open(fake if f == "/proc/cpuinfo" else f, *a, **kw))
    assert cpu_model() == "Example CPU 9000 @ 3.0GHz"
    fake.write_text("processor\t: 0\n")  # no model name line (some ARM kernels)
    assert cpu_model() == (platform.processor() or platform.machine())

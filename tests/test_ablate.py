"""A tiny ablation end to end (two variants, few steps, synthetic data): the command runs and its table is sane."""
import json

from fae_fast.ablate import VARIANTS, markdown_table, smoothing_grid, variant_config
from fae_fast.cli import main
from fae_fast.config import preset
from fae_fast.synthetic import make_dataset


def test_variant_configs_change_only_what_they_name():
    base = preset("tiny")
    assert variant_config(base, "fae", 3).noise.mode == "symmetric"
    assert variant_config(base, "no_noise", 0).noise.mode == "none"
    assert variant_config(base, "independent_noise", 0).noise.mode == "independent"
    ae = variant_config(base, "plain_ae", 0)
    assert ae.corruption.p == 0.0 and ae.noise.mode == "none"
    op = variant_config(base, "opaque", 0)
    assert op.corruption.beta_min == op.corruption.beta_max == 1.0
    assert variant_config(base, "no_thin_strokes", 0).corruption.w_stroke == 0.0
    assert variant_config(base, "fae", 3).train.seed == 3
    assert base.noise.mode == "symmetric" and base.corruption.p == 0.8  # base untouched
    assert set(VARIANTS) >= {"fae", "no_noise", "input_noise", "independent_noise", "plain_ae"}


def test_smoothing_grid_holds_the_default_and_valid_windows():
    grid = smoothing_grid(4, 7)
    assert (4, 7) in grid and (0, 1) in grid
    assert all(k % 2 == 1 and 1 <= k <= 31 and 0 <= n <= 8 for n, k in grid)


def test_tiny_ablation_end_to_end(tmp_path, capsys):
    data = make_dataset(tmp_path / "d", n_train=10, n_test_good=3, n_test_defect=2, size=(32, 32), seed=2)
    out = tmp_path / "ablation.json"
    rc = main(["ablate", "--data", str(data), "--variants", "fae,plain_ae", "--seeds", "0", "--steps", "2",
               "--size", "32", "--preset", "tiny", "--batch-size", "4", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [(r["variant"], r["seed"]) for r in res["runs"]] == [("fae", 0), ("plain_ae", 0)]
    for r in res["runs"]:
        assert 0.0 <= r["image_auroc"] <= 1.0 and 0.0 <= r["pixel_auroc"] <= 1.0
    assert len(res["smoothing"]) == len(smoothing_grid(*res["smoothing_default"]))
    assert "| fae (n=1) |" in markdown_table(res)
    assert "plain_ae" in capsys.readouterr().out


def _part(variant, seeds, sweep_rows=()):
    runs = [{"variant": variant, "seed": s, **{m: 0.5 + 0.1 * s for m in
                                               ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap",
                                                "image_f1max")}} for s in seeds]
    return {"dataset": "/d", "image_size": [32, 32], "steps": 5, "smoothing_default": [4, 3], "seeds": list(seeds),
            "config": {"model": {"widths": [16, 32]}},
            "seconds": 1.0, "runs": runs, "smoothing_runs": {"n=4,k=3": list(sweep_rows)}}


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

"""End to end through the command line: train -> eval -> predict on a tiny synthetic set, and bad input."""
import json

import numpy as np
import pytest

from fae_fast.cli import main
from tests.helpers import cli_trained_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return cli_trained_model(tmp_path_factory.mktemp("cli"), steps=3)


def test_eval_writes_the_metrics_json(tiny, capsys):
    root, data, model = tiny
    out = root / "metrics.json"
    assert main(["eval", "--model", str(model), "--data", str(data), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "overall" in table
    res = json.loads(out.read_text())
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1max"):
        v = res["overall"][key]
        assert v is None or 0.0 <= v <= 1.0
    assert set(res["per_defect"]) == {p.name for p in (data / "test").iterdir() if p.name != "good"}


def test_eval_counts_a_thin_crack_shrunk_to_the_model_as_one_region(tiny, tmp_path):
    # AU-PRO's regions are the defects as drawn: a 1-2 px diagonal crack drawn at 72 x 72, shrunk to the
    # model's 32 x 32, breaks into pieces, yet eval counts it as one region
    import shutil

    import cv2

    from fae_fast.data.io import resize_mask

    _, data, model = tiny
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    img = next((copy / "test" / "scratch").glob("*.png"))
    cv2.imwrite(str(img), cv2.resize(cv2.imread(str(img)), (72, 72)))
    crack = np.zeros((72, 72), np.uint8)
    for y in range(4, 68):
        crack[y, y] = 255
        if y % 3:
            crack[y, y + 1] = 255
    cv2.imwrite(str(copy / "ground_truth" / "scratch" / f"{img.stem}_mask.png"), crack)
    pieces = cv2.connectedComponents(resize_mask(crack > 127, (32, 32)).astype(np.uint8), connectivity=8)[0] - 1
    assert pieces > 1  # the case this test is about
    drawn = sum(cv2.connectedComponents((cv2.imread(str(p), 0) > 127).astype(np.uint8), connectivity=8)[0] - 1
                for p in (copy / "ground_truth").rglob("*_mask.png"))
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(model), "--data", str(copy), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["overall"]["n_regions"] == drawn


def test_predict_writes_overlays_masks_csv_and_json(tiny):
    root, data, model = tiny
    out = root / "pred"
    inputs = [str(data / "test" / "good" / "001.png"), str(data / "test" / "good" / "002.png"),
              str(data / "test" / "scratch" / "000.png")]
    assert main(["predict", "--model", str(model), *inputs, "--out", str(out), "--save-maps"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["results"]) == 3
    amap = np.load(out / "000_map.npy")
    assert amap.shape == (32, 32) and amap.dtype == np.float32 and np.isfinite(amap).all()
    for row in res["results"]:
        assert (out / row["overlay"]).is_file()
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("file,score") and len(csv_lines) == 4
    assert sorted(p.name for p in out.glob("*_mask.png")) == ["000_mask.png", "001_mask.png", "002_mask.png"]
    assert not list(out.glob(".*.tmp"))


def test_predict_refuses_outputs_that_would_overwrite_each_other(tiny, capsys):
    root, data, model = tiny
    inputs = [str(data / "test" / "good"), str(data / "test" / "scratch")]
    assert main(["predict", "--model", str(model), *inputs, "--out", str(root / "dup")]) == 2
    assert "share file stems" in capsys.readouterr().err


def test_bad_inputs_name_the_file(tiny, tmp_path, capsys):
    root, data, model = tiny
    bogus = tmp_path / "not_a_model.fae"
    bogus.write_bytes(b"hello")
    assert main(["predict", "--model", str(bogus), str(data / "test" / "good"), "--out", str(tmp_path / "o")]) == 2
    assert str(bogus) in capsys.readouterr().err
    broken = tmp_path / "imgs"
    broken.mkdir()
    (broken / "frame.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    assert main(["predict", "--model", str(model), str(broken), "--out", str(tmp_path / "o2")]) == 2
    assert "frame.png" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "m.fae"), "--steps", "1"]) == 2
    assert str(empty) in capsys.readouterr().err
    assert not (tmp_path / "m.fae").exists()

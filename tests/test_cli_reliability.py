"""The command line on an inspection line: nothing overwritten, nothing lost, every mistake one line (issue 11)."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from fae_fast import cli
from fae_fast.api import Detector
from fae_fast.cli import main
from tests.helpers import cli_trained_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return cli_trained_model(tmp_path_factory.mktemp("cli_rel"), steps=2)


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _goods(data, n=3):
    return sorted((data / "test" / "good").glob("*.png"))[:n]


# ------------------------------------------------------------------------------------------ item 5: inputs


def test_predict_never_overwrites_an_input(tiny, tmp_path, capsys):
    """The reported case: --out the input folder, which holds part.png and its ground truth part_mask.png."""
    root, data, model = tiny
    folder = tmp_path / "line"
    folder.mkdir()
    shutil.copy(_goods(data)[0], folder / "part.png")
    shutil.copy(sorted((data / "ground_truth").glob("*/*.png"))[0], folder / "part_mask.png")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["predict", "--model", str(model), str(folder), "--out", str(folder)]) == 2
    _one_error_line(capsys, "holds the input")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # also an input named one by one, and an --out above the inputs
    assert main(["predict", "--model", str(model), str(folder / "part.png"), "--out", str(tmp_path)]) == 2
    _one_error_line(capsys, "holds the input", "part.png")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ------------------------------------------------------------------------------------------ item 7: results


def test_a_bad_image_keeps_the_rows_before_it_and_skip_lists_it(tiny, tmp_path, capsys):
    root, data, model = tiny
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in _goods(data):
        shutil.copy(p, imgs / p.name)
    (imgs / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model), str(imgs), "--out", str(out), "--batch-size", "1"]) == 2
    _one_error_line(capsys, "zz_broken.png", "results.jsonl", "--on-error skip")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [os.path.basename(r["file"]) for r in rows] == [p.name for p in _goods(data)]
    assert all(np.isfinite(r["score"]) and r["error"] is None for r in rows)
    assert not (out / "results.json").exists()

    assert main(["predict", "--model", str(model), str(imgs), "--out", str(out), "--on-error", "skip"]) == 0
    assert "1 skipped" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["n_scored"] == 3 and res["n_skipped"] == 1
    bad = [r for r in res["results"] if r["error"]]
    assert len(bad) == 1 and bad[0]["file"].endswith("zz_broken.png") and bad[0]["score"] is None
    assert "cannot decode" in bad[0]["error"]
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "file,score,label,defect_fraction,overlay,error" and len(csv_lines) == 5
    assert len((out / "results.jsonl").read_text().splitlines()) == 4


def test_skip_lists_non_image_files_of_a_folder(tiny, tmp_path, capsys):
    root, data, model = tiny
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(_goods(data)[0], imgs / "a.png")
    (imgs / "notes.txt").write_text("shift 3")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model), str(imgs), "--out", str(out), "--on-error", "skip"]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert sorted(os.path.basename(r["file"]) for r in rows) == ["a.png", "notes.txt"]
    assert "not an image" in next(r["error"] for r in rows if r["file"].endswith("notes.txt"))


def test_each_batch_is_on_disk_before_the_next_is_scored(tiny, tmp_path, monkeypatch):
    """What a kill -9 mid-run leaves: every finished batch, read from disk while the next one is scored."""
    root, data, model = tiny
    out = tmp_path / "out"
    seen = []
    real = Detector.anomaly_maps

    def spy(self, images, **kw):
        log = out / "results.jsonl"
        seen.append(len(log.read_text().splitlines()) if log.exists() else 0)
        if len(seen) == 3:
            raise KeyboardInterrupt  # the operator pulls the plug during the third batch
        return real(self, images, **kw)

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, p in enumerate(sorted((data / "test").glob("*/*.png"))[:6]):
        shutil.copy(p, imgs / f"{i}.png")
    monkeypatch.setattr(Detector, "anomaly_maps", spy)
    with pytest.raises(KeyboardInterrupt):
        main(["predict", "--model", str(model), str(imgs), "--out", str(out), "--batch-size", "2"])
    assert seen == [0, 2, 4]
    assert len((out / "results.jsonl").read_text().splitlines()) == 4


def test_an_older_runs_summary_does_not_survive_a_failed_run(tiny, tmp_path, capsys):
    root, data, model = tiny
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model), str(_goods(data)[0]), "--out", str(out)]) == 0
    assert (out / "results.json").is_file()
    assert main(["predict", "--model", str(model), str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    assert (out / "results.json").is_file()  # refused before the run started: nothing touched
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["predict", "--model", str(model), str(broken), "--out", str(out)]) == 2
    assert not (out / "results.json").exists() and not (out / "results.csv").exists()
    capsys.readouterr()


def test_a_second_writer_of_the_same_folder_is_refused(tiny, tmp_path, capsys):
    root, data, model = tiny
    out = tmp_path / "out"
    args = ["predict", "--model", str(model), str(_goods(data)[0]), "--out", str(out)]
    with cli.lock_folder(out):  # another run in this process
        assert main(args) == 2
    _one_error_line(capsys, "in use by another fae-fast run", f"pid {os.getpid()}")
    # another process holding the lock
    out.mkdir(exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(out / cli.LOCK_NAME)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(args) == 2
        _one_error_line(capsys, "in use by another fae-fast run")
    finally:
        holder.kill()
        holder.wait()
    # the lock died with its process (a kill -9 leaves no stale lock); the file left behind blocks nothing
    assert (out / cli.LOCK_NAME).exists()
    assert main(args) == 0
    assert len(json.loads((out / "results.json").read_text())["results"]) == 1


# ------------------------------------------------------------------------------------------ items 8, 10: errors


@pytest.fixture
def cfg_file(tmp_path):
    def write(obj):
        p = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.json')))}.json"
        p.write_text(json.dumps(obj))
        return str(p)

    return write


def test_one_line_errors_before_any_work(tiny, tmp_path, capsys, cfg_file):
    root, data, model = tiny
    m, good = str(model), str(_goods(data)[0])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    pred = ["predict", "--model", m, good, "--out"]
    train = ["train", "--data", str(data), "--preset", "tiny", "--size", "32", "--steps", "2", "--device", "cpu"]
    cases = [
        (pred + [str(tmp_path / "o"), "--device", "bogus"], "--device 'bogus'"),
        (pred + [str(a_file)], f"--out {a_file}: exists and is not a folder"),
        (pred + [str(tmp_path / "o"), "--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (pred + [str(tmp_path / "o"), "--batch-size", "-3"], "--batch-size -3: must be >= 1"),
        (pred + [str(tmp_path / "o"), "--image-threshold", "nan"], "--image-threshold nan"),
        (pred + [str(tmp_path / "o"), "--pixel-threshold", "inf"], "--pixel-threshold inf"),
        (pred + [str(a_file / "sub")], "is not a folder"),
        (["eval", "--model", m, "--data", str(data), "--report", str(a_file)], f"--report {a_file}: exists"),
        (["eval", "--model", m, "--data", str(data), "--json", str(a_dir)], f"--json {a_dir}: is a folder"),
        (["eval", "--model", m, "--data", str(data), "--batch-size", "0"], "--batch-size 0"),
        (train + ["--out", str(a_dir)], f"--out {a_dir}: is a folder"),
        (train + ["--out", str(a_file / "m.fae")], "is not a folder"),
        (train + ["--out", str(tmp_path / "m.fae"), "--config", cfg_file([{"train": {}}])], "got list"),
        (train + ["--out", str(tmp_path / "m.fae"), "--config", cfg_file({"train": {"lr": "fast"}})],
         "train.lr must be a finite number, got 'fast'"),
        (train + ["--out", str(tmp_path / "m.fae"), "--config", cfg_file({"train": {"threshold_quantile": 2.0}})],
         "train.threshold_quantile must be in [0, 1], got 2.0"),
        (train + ["--out", str(tmp_path / "m.fae"), "--batch-size", "0"], "--batch-size 0: config train.batch_size"),
        (train + ["--out", str(tmp_path / "m.fae"), "--lr", "0"], "--lr 0.0: config train.lr"),
        (train + ["--out", str(tmp_path / "m.fae"), "--steps", "0"], "--steps 0: config train.steps"),
        (train + ["--out", str(tmp_path / "m.fae"), "--size", "16x9000"], "--size 16x9000"),
    ]
    if not torch.cuda.is_available():
        cases.append((pred + [str(tmp_path / "o"), "--device", "cuda"], "CUDA is not available"))
    for argv, needle in cases:
        assert main(argv) == 2, argv
        line = _one_error_line(capsys, needle)
        if "--config" in argv:
            assert argv[argv.index("--config") + 1] in line  # the file is named
        assert not capsys.readouterr().out  # refused before training, scoring or printing anything
    assert not (tmp_path / "m.fae").exists() and not (tmp_path / "o").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_fifo_among_the_inputs_does_not_hang(tiny, tmp_path, capsys):
    root, data, model = tiny
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(_goods(data)[0], imgs / "a.png")
    os.mkfifo(imgs / "frame.png")
    signal.alarm(60)  # a hang fails the test instead of the whole run
    try:
        assert main(["predict", "--model", str(model), str(imgs), "--out", str(tmp_path / "o")]) == 2
        _one_error_line(capsys, "not a regular file", "frame.png")
        assert main(["predict", "--model", str(model), str(imgs / "frame.png"), "--out", str(tmp_path / "o")]) == 2
        _one_error_line(capsys, "not a regular file", "frame.png")
        assert main(["predict", "--model", str(model), str(imgs), "--out", str(tmp_path / "o"),
                     "--on-error", "skip"]) == 0
    finally:
        signal.alarm(0)
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["results"]
    assert {os.path.basename(r["file"]): r["error"] for r in rows} == {"a.png": None,
                                                                         "frame.png": "not a regular file"}


def _enospc(path):
    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return fail


def test_eval_prints_the_metrics_before_writing_files(tiny, tmp_path, capsys, monkeypatch):
    root, data, model = tiny
    import fae_fast.report

    monkeypatch.setattr(fae_fast.report, "write_report", _enospc(tmp_path / "rep" / "report.html"))
    assert main(["eval", "--model", str(model), "--data", str(data), "--report", str(tmp_path / "rep")]) == 2
    out, err = capsys.readouterr()
    assert "overall" in out and "Traceback" not in err
    assert err.strip() == f"fae-fast eval: error: no space left on device: {tmp_path / 'rep' / 'report.html'}"
    monkeypatch.setattr(cli, "_write_json", _enospc(tmp_path / "m.json"))
    assert main(["eval", "--model", str(model), "--data", str(data), "--json", str(tmp_path / "m.json")]) == 2
    out, err = capsys.readouterr()
    assert "overall" in out and err.count("\n") == 1 and "no space left on device" in err


# ------------------------------------------------------------------------------------------ item 11: layering


def test_config_file_layers_on_the_preset_and_flags_win(tiny, tmp_path, capsys, cfg_file):
    root, data, model = tiny
    out = tmp_path / "m.fae"
    partial = cfg_file({"noise": {"mode": "input"}, "train": {"steps": 50, "lr": 0.01, "loss": "squared+ssim",
                                                               "ssim_weight": 0.5}, "model": {"hide_cell": 8},
                       "map": {"image_score": "max+template", "frame_scale": 2}})
    assert main(["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--config", partial,
                 "--steps", "2", "--size", "32x48", "--batch-size", "4", "--quiet", "--device", "cpu"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    for s in ("preset tiny", partial, "size 32x48", "2 steps", "noise input", "(16, 32, 64, 128)", "lr 0.01",
              "8 px cells inpainted", "squared+ssim (1 - SSIM x0.5) loss", "frames 64x96 (the template's)",
              "frames at 2x"):
        assert s in first, (s, first)
    cfg = Detector.load(out, device="cpu").config
    assert cfg.model.widths == (16, 32, 64, 128) and cfg.noise.mode == "input"  # preset kept, file applied
    assert cfg.model.hide_cell == 8
    # this tiny set holds out too few images for the statistics: the score falls back to the map's max (warned), and
    # with it the frames to the network's size
    assert (cfg.map.image_score, cfg.map.frame_scale, cfg.map.normalize) == ("max", 1, "none")
    assert cfg.train.steps == 2 and cfg.train.lr == 0.01 and cfg.train.image_size == (32, 48)  # flags win


def test_train_first_line_shows_the_resolved_auto_size(tiny, tmp_path, capsys):
    root, data, model = tiny
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m.fae"), "--preset", "tiny",
                 "--steps", "1", "--batch-size", "4", "--quiet", "--device", "cpu"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("train: preset tiny, size 128x128 (HxW), 1 steps") and "noise none" in first


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_model_and_config_must_be_regular_files(tiny, tmp_path, capsys):
    root, data, model = tiny
    fifo = tmp_path / "model.fae"
    os.mkfifo(fifo)
    signal.alarm(60)
    try:
        assert main(["predict", "--model", str(fifo), str(_goods(data)[0]), "--out", str(tmp_path / "o")]) == 2
        _one_error_line(capsys, f"--model {fifo}: not a regular file")
        assert main(["eval", "--model", str(tmp_path), "--data", str(data)]) == 2
        _one_error_line(capsys, "--model", "not a regular file")
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "m.fae"), "--config", str(fifo)]) == 2
        _one_error_line(capsys, f"--config {fifo}: not a regular file")
    finally:
        signal.alarm(0)


def test_a_pixel_bomb_is_one_line_naming_the_file(tiny, tmp_path, capsys):
    """A 389 KB PNG of 20000 x 20000 took 7.3 GB and died with a traceback; here only its header is read."""
    root, data, model = tiny
    buf = bytearray((_goods(data)[0]).read_bytes())
    buf[16:24] = np.array([20000, 20000], dtype=">u4").tobytes()
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bytes(buf))
    assert main(["predict", "--model", str(model), str(bomb), "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys, "too large", "bomb.png", "FAE_FAST_MAX_IMAGE_PIXELS")

"""Training on several processes (fae_fast.distributed): keyed per-sample streams, rank shares of the batch, and
torchrun with 2 gloo processes on the CPU against one process (CLI end to end, in CI).

The multi-process tests start ``python -m torch.distributed.run --standalone`` (torchrun) on 32x32 images with a
two-level U-Net of width 4-8: each launch costs a few seconds, mostly interpreter and torch start-up.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fae_fast import distributed
from fae_fast.config import CorruptionConfig, FAEConfig
from fae_fast.corruption import Corruptor
from fae_fast.data import TrainSampler
from fae_fast.train import batch_loss, train

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- keyed streams
def _keyed_inputs(x, pool, offset, block=1, backend="torch"):
    """(network input, loss) of batch_loss on ``x`` = global samples offset.., with an identity network."""
    seen = []

    def fwd(inp):
        seen.append(inp.detach().clone())
        return inp * 0.5

    cor = Corruptor(CorruptionConfig(), image_size=tuple(x.shape[2:]), device=x.device)
    gen = torch.Generator(device=x.device)
    loss = batch_loss(fwd, x, cor, gen, step=3, seed=11, sigma_max=0.1, pool=pool, noise_backend=backend,
                      keyed=(offset, block))
    return seen[0], loss


@pytest.mark.parametrize("backend,device", [("torch", "cpu"), ("triton", "cpu"),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_a_sample_is_corrupted_and_noised_alike_in_any_share_of_the_batch(backend, device):
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    x = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8).to(device)
    pool = (torch.rand(6, 3, 16, 16) * 255).to(torch.uint8).to(device)
    full, loss_full = _keyed_inputs(x, pool, 0, backend=backend)        # one process: batch of 4
    r0, loss0 = _keyed_inputs(x[:2], pool, 0, backend=backend)          # rank 0 of 2: samples 0, 1
    r1, loss1 = _keyed_inputs(x[2:], pool, 2, backend=backend)          # rank 1 of 2: samples 2, 3
    # sample 3 at position 3 of the whole batch == position 1 of rank 1's share: same corruption, sigma and eps
    torch.testing.assert_close(r1[1], full[3], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([r0, r1]), full, rtol=0, atol=0)
    # the loss (same eps regenerated on the target side) averages over the shares like DDP's gradients
    torch.testing.assert_close((loss0 + loss1) / 2, loss_full, rtol=1e-6, atol=1e-7)
    # the key is the global index: the same images at another offset are corrupted differently
    other, _ = _keyed_inputs(x[2:], pool, 0, backend=backend)
    assert not torch.equal(other, r1)


def test_keyed_blocks_split_at_block_boundaries():
    x = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)
    full, _ = _keyed_inputs(x, None, 0, block=2)
    half, _ = _keyed_inputs(x[2:], None, 2, block=2)  # pool None: a block borrows from its own images
    torch.testing.assert_close(half, full[2:], rtol=0, atol=0)


@pytest.mark.parametrize("crop", [None, (8, 8)])
def test_sampler_rows_are_the_rows_of_the_global_batch(crop):
    images = (torch.rand(5, 3, 12, 12) * 255).to(torch.uint8)
    whole = TrainSampler(images, 4, torch.Generator().manual_seed(1), flip=True, rot90=True, crop=crop, shift=2)
    shares = [TrainSampler(images, 4, torch.Generator().manual_seed(1), flip=True, rot90=True, crop=crop, shift=2,
                           rows=distributed.rank_rows(4, distributed.Dist(r, 2)))
              for r in range(2)]
    for _ in range(3):  # across an epoch boundary (5 images, batches of 4)
        torch.testing.assert_close(torch.cat([s.next() for s in shares]), whole.next(), rtol=0, atol=0)


def test_shards_and_rows():
    # DALI's readers.file rule: contiguous, in order, every item once, sizes differing by at most one
    spans = [distributed.shard_range(10, i, 4) for i in range(4)]
    assert spans == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert distributed.rank_rows(8, distributed.Dist(1, 2)) == (4, 8)
    with pytest.raises(ValueError, match="multiple of the world size 4"):
        distributed.rank_rows(6, distributed.Dist(0, 4))
    with pytest.raises(ValueError, match="stream_block 3"):
        distributed.rank_rows(8, distributed.Dist(0, 2), block=3)


def test_the_shards_are_the_dali_readers_shards(tmp_path):
    """shard_range (which the cv2 decoding uses) splits a file list exactly like DALI's ``readers.file``."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    files = []
    for i in range(10):  # the reader does not decode: any bytes
        (tmp_path / f"{i}.bin").write_bytes(b"x")
        files.append(str(tmp_path / f"{i}.bin"))
    for n in (3, 4):
        for sid in range(n):
            @pipeline_def(batch_size=1, num_threads=1, device_id=None)
            def pipe():
                _, labels = fn.readers.file(files=files, labels=list(range(10)), shard_id=sid, num_shards=n,
                                            stick_to_shard=True, random_shuffle=False)
                return labels

            p = pipe()
            p.build()
            lo, hi = distributed.shard_range(10, sid, n)
            got = [int(p.run()[0].as_array()[0, 0]) for _ in range(hi - lo + 1)]
            assert got == list(range(lo, hi)) + [lo], (n, sid, got)  # the shard, then it wraps to its start


def _tiny_cfg(**train) -> FAEConfig:
    cfg = FAEConfig.from_dict({"model": {"widths": [4, 8], "dilations": [1], "norm": "group"},
                               "noise": {"sigma_max": 0.1},
                               "map": {"normalize": "none"},
                               "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "image_size": [16, 16],
                                         "channels_last": False, "checkpoint_every": 2, **train}})
    return cfg


def test_a_keyed_state_resumes_on_one_process_and_batch_refuses_it(tmp_path):
    images = (torch.rand(8, 3, 16, 16) * 255).to(torch.uint8)
    ck = tmp_path / "state.pt"
    full = train(_tiny_cfg(streams="keyed"), images, progress=False).model.state_dict()
    train(_tiny_cfg(streams="keyed"), images, checkpoint=ck, stop_at=2, progress=False)
    # "auto" on one process would pick batch streams; resuming a keyed file it continues the keyed ones
    resumed = train(_tiny_cfg(streams="auto"), images, resume=ck, progress=False).model.state_dict()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="trained with streams 'keyed'"):
        train(_tiny_cfg(streams="batch"), images, resume=ck, progress=False)


# ---------------------------------------------------------------------------------------------- torchrun
def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop(distributed.FAULT_ENV, None)
    env.update(extra)
    return env


def _run(args, env, nproc=None, restarts=0, timeout=240) -> subprocess.CompletedProcess:
    cmd = [sys.executable]
    if nproc:
        cmd += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
                "--max-restarts", str(restarts)]
    cmd += ["-m", "fae_fast.cli"] + [str(a) for a in args]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A 32x32 MVTec-layout set, a config with keyed streams, and the 2-process run every test compares to."""
    from fae_fast.synthetic import make_dataset

    tmp = tmp_path_factory.mktemp("ddp")
    data = make_dataset(tmp / "cat", n_train=12, n_test_good=3, n_test_defect=1, size=(32, 32),
                        defects=("scratch", "stain"))
    cfg = {"model": {"widths": [4, 8], "dilations": [1], "norm": "group"},
           "noise": {"mode": "symmetric", "sigma_max": 0.1, "sigma_reference": "absolute"},
           "map": {"normalize": "none"},
           "train": {"steps": 6, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2, "streams": "keyed",
                     "channels_last": False, "holdout_fraction": 0.25}}
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    common = ["train", "--data", data, "--config", tmp / "cfg.json", "--preset", "tiny", "--size", "32x32",
              "--device", "cpu", "--quiet"]
    p = _run(common + ["--out", tmp / "two.fae", "--checkpoint", tmp / "two.pt"], _env(), nproc=2)
    return {"tmp": tmp, "data": data, "common": common, "two": p}


def _weights(path):
    from fae_fast.checkpoint import load_model_file

    mf = load_model_file(path, map_location="cpu")
    return mf.state, mf.thresholds


@pytest.mark.slow
def test_two_processes_train_the_model_of_one_process_with_the_global_batch(job):
    tmp = job["tmp"]
    first = job["two"].stdout.splitlines()[0]
    assert first.startswith("train: world size 2 (gloo, cpu), no BatchNorm (model.norm=group)"), first
    assert "batch 4 (global)" in first
    assert job["two"].stdout.count("trained 6 steps") == 1  # rank 0 alone reports
    _run(job["common"] + ["--out", tmp / "one.fae"], _env())
    two, t2 = _weights(tmp / "two.fae")
    one, t1 = _weights(tmp / "one.fae")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # the held-out maps were computed split over the ranks and gathered: the same thresholds
    for k in ("image", "pixel"):
        assert t2[k] == pytest.approx(t1[k], rel=1e-4, abs=1e-9)


@pytest.mark.slow
def test_a_killed_rank_restarts_from_the_last_checkpoint_and_ends_where_an_uninterrupted_run_ends(job):
    tmp = job["tmp"]
    # rank 1 dies after step 5 on the first attempt; the last checkpoint is step 4; torchrun restarts both ranks
    p = _run(job["common"] + ["--out", tmp / "killed.fae", "--checkpoint", tmp / "killed.pt"],
             _env(**{distributed.FAULT_ENV: "1:5"}), nproc=2, restarts=1)
    assert "exitcode: 13" in p.stderr  # it did die
    assert f"resuming from {tmp / 'killed.pt'} (torchrun restart 1)" in p.stdout
    killed, _ = _weights(tmp / "killed.fae")
    two, _ = _weights(tmp / "two.fae")
    for k in two:
        torch.testing.assert_close(killed[k], two[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_evaluation_split_across_two_processes_gives_the_one_process_metrics(job):
    tmp = job["tmp"]
    args = ["eval", "--model", tmp / "two.fae", "--data", job["data"], "--device", "cpu", "--batch-size", "2",
            "--engine-backend", "torch"]
    _run(args + ["--json", tmp / "m2.json"], _env(), nproc=2)
    _run(args + ["--json", tmp / "m1.json"], _env())
    m2, m1 = _flat(json.loads((tmp / "m2.json").read_text())), _flat(json.loads((tmp / "m1.json").read_text()))
    assert m2.keys() == m1.keys() and "overall.image_auroc" in m1 and "overall.pixel_aupro" in m1
    for k, v in m1.items():
        assert m2[k] == pytest.approx(v, rel=1e-6, abs=1e-9, nan_ok=True), k


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.gpu
def test_torchrun_on_one_gpu_runs_nccl_ddp_and_syncbatchnorm(tmp_path):
    """The CUDA path (NCCL, DDP, SyncBatchNorm converted and converted back) with ``--nproc-per-node 1``: a GPU
    machine with one device cannot run two NCCL ranks; the result equals a plain run up to cuDNN's reduction order."""
    from fae_fast.synthetic import make_dataset

    data = make_dataset(tmp_path / "cat", n_train=10, n_test_good=1, n_test_defect=1, size=(32, 32),
                        defects=("scratch",))
    cfg = {"model": {"widths": [8, 16], "dilations": [1], "norm": "batch"}, "map": {"normalize": "none"},
           "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2, "streams": "keyed",
                     "amp": "fp32", "holdout_fraction": 0.3}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    common = ["train", "--data", data, "--config", tmp_path / "cfg.json", "--preset", "tiny", "--size", "32x32",
              "--device", "cuda", "--quiet"]
    p = _run(common + ["--out", tmp_path / "ddp.fae", "--checkpoint", tmp_path / "ddp.pt"], _env(), nproc=1)
    first = p.stdout.splitlines()[0]
    assert first.startswith("train: world size 1 (nccl, cuda), SyncBatchNorm"), first
    _run(common + ["--out", tmp_path / "plain.fae"], _env())
    ddp, _ = _weights(tmp_path / "ddp.fae")
    plain, _ = _weights(tmp_path / "plain.fae")
    assert ddp.keys() == plain.keys()  # SyncBatchNorm converted back: the same BatchNorm2d state
    for k in plain:
        torch.testing.assert_close(ddp[k].float(), plain[k].float(), rtol=0, atol=5e-3,
                                   msg=lambda m, k=k: f"{k}: {m}")

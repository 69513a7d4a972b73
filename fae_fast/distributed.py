"""Training on several processes with ``torchrun`` (torch.distributed, DDP).

    torchrun --nproc-per-node 2 -m fae_fast.cli train --data DIR --out M.fae --checkpoint state.pt

What a run on N processes does (``fae_fast.train.train`` calls into this module; one process changes nothing):

* the process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``...): NCCL on CUDA with one device per local rank (``cuda:LOCAL_RANK``), gloo on the CPU;
* ``cfg.train.batch_size`` stays the *global* batch B: each process takes rows ``[r B/N, (r + 1) B/N)`` of the
  batch that one sampler, seeded alike on every process, draws (:class:`fae_fast.data.TrainSampler` ``rows=``);
* every sample's corruption, sigma and noise come from streams keyed by (seed, step, global sample index)
  (``cfg.train.streams="keyed"``), so N processes train the model one process trains with the same config and
  ``streams="keyed"``, up to the order of the gradient all-reduce;
* BatchNorm: ``SyncBatchNorm`` on CUDA; on the CPU it refuses to run, so each process keeps local BatchNorm
  (statistics of its B/N images: a batch-independent ``model.norm`` keeps the one-process equivalence);
* rank 0 alone writes checkpoints, the model file, logs and the progress bar; the training state it writes holds
  nothing per rank, so a one-process run with ``streams="keyed"`` (or "auto") can resume it too;
* held-out maps are computed split across the ranks (contiguous shards, the rule of DALI's ``shard_id`` /
  ``num_shards``) and gathered in order, so thresholds equal the one-process ones.

Everything here is a no-op (or returns its input) outside torchrun, and nothing imports ``torch.distributed`` until
a function runs. ``torchrun --nproc-per-node 1`` runs the distributed path with one process (DDP, NCCL, the
SyncBatchNorm layers, which then normalise like BatchNorm): the GPU check exercises it on one GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Dist", "under_torchrun", "env_world", "restart_count", "setup", "current", "shutdown", "shard_range",
           "rank_rows", "describe", "prepare_model", "wrap", "unwrap_model", "broadcast_module", "finish_models",
           "mean_across", "gather_rows", "sharded_map", "sharded_load", "fault_hook"]

#: test hook: ``"RANK:STEP"`` makes that rank exit (status 13) after STEP steps, on torchrun's first attempt only
FAULT_ENV = "FAE_FAST_TEST_KILL_RANK_AT"


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its node, ``backend``
    ("nccl" | "gloo", None on one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """In a process group (under torchrun, ``--nproc-per-node 1`` included: DDP, NCCL and SyncBatchNorm run)."""
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def under_torchrun() -> bool:
    """torchrun's environment is set (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``): the env:// rendezvous can run."""
    return all(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


def restart_count() -> int:
    """How often torchrun has restarted this job's workers (``TORCHELASTIC_RESTART_COUNT``; 0 outside torchrun)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the job's process group (once per process) and pick this process's device.

    Args:
        device: the resolved training device; on CUDA each process uses ``cuda:LOCAL_RANK`` instead.

    Returns:
        (:class:`Dist`, device). Outside torchrun: ``(Dist(), device)`` and no process group.
    """
    if not under_torchrun():
        return Dist(), device
    rank, world, local = env_world()
    import torch.distributed as dist

    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s): start at "
                             "most one process per GPU (torchrun --nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"training on several processes needs a CPU or CUDA device, got {device}")
    if not dist.is_initialized():
        # torchrun's store outlives a restart (--max-restarts) with the keys of the failed attempt in it: gloo's
        # full-mesh connect then reads a dead peer's address and waits forever (measured: torch 2.13, gloo,
        # --standalone). Keys under a prefix per attempt keep the attempts apart.
        store, _, _ = next(dist.rendezvous("env://", rank, world))
        store = dist.PrefixStore(f"fae_fast/attempt_{restart_count()}/", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    elif dist.get_backend() != backend or dist.get_world_size() != world:
        raise ValueError(f"a process group ({dist.get_backend()}, world size {dist.get_world_size()}) already "
                         f"exists; this run needs {backend} with world size {world}")
    return Dist(rank, world, local, backend), device


def current() -> Dist:
    """The :class:`Dist` of the process group :func:`setup` joined (``Dist()`` outside torchrun or before it)."""
    import torch.distributed as dist

    if not (under_torchrun() and dist.is_available() and dist.is_initialized()):
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), env_world()[2], dist.get_backend())


def shutdown() -> None:
    """Leave the process group (after the last collective call; a no-op on one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_range(n: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """The contiguous [start, stop) of ``n`` items that shard ``shard_id`` of ``num_shards`` reads: DALI readers'
    rule (``n * shard_id // num_shards`` to ``n * (shard_id + 1) // num_shards``), used for the cv2 path too."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


def rank_rows(batch_size: int, d: Dist, block: int = 1) -> tuple[int, int]:
    """This rank's rows [start, stop) of a global batch of ``batch_size``; it must split into equal shares that
    are whole stream blocks."""
    if batch_size % d.world_size:
        raise ValueError(f"train.batch_size {batch_size} is the global batch and must be a multiple of the world "
                         f"size {d.world_size}")
    per = batch_size // d.world_size
    if per % block:
        raise ValueError(f"the per-process batch {per} (train.batch_size {batch_size} / world size "
                         f"{d.world_size}) must be a multiple of train.stream_block {block}")
    return d.rank * per, (d.rank + 1) * per


def _has_bn(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def describe(d: Dist, device: torch.device, model_norm: str) -> str:
    """The line a run starts with: ``"world size 2 (gloo), BatchNorm: local per process ..."``."""
    if model_norm != "batch":
        bn = f"no BatchNorm (model.norm={model_norm})"
    elif not d.active:
        bn = "BatchNorm"
    elif device.type == "cuda":
        bn = "SyncBatchNorm"
    else:
        bn = "local BatchNorm per process (SyncBatchNorm needs CUDA)"
    where = f"{d.backend}, " if d.backend else ""
    return f"world size {d.world_size} ({where}{device.type}), {bn}"


def prepare_model(model: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    """Before the optimiser is built: BatchNorm -> SyncBatchNorm on CUDA (the parameters are the same objects)."""
    if d.active and device.type == "cuda" and _has_bn(model):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap(model: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    """The module the training step calls: ``DistributedDataParallel(model)`` on several processes (gradients
    averaged over the ranks; buffers such as BatchNorm's running statistics broadcast from rank 0 every step)."""
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """SyncBatchNorm layers back to ``BatchNorm2d`` with the same parameters and statistics (the inference engine
    folds ``BatchNorm2d``); other modules unchanged, in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.SyncBatchNorm):
            bn = torch.nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats, device=child.weight.device if child.affine
                                      else None)
            with torch.no_grad():
                if child.affine:
                    bn.weight, bn.bias = child.weight, child.bias
                if child.track_running_stats:
                    bn.running_mean, bn.running_var = child.running_mean, child.running_var
                    bn.num_batches_tracked = child.num_batches_tracked
            bn.train(child.training)
            setattr(model, name, bn)
        else:
            unwrap_model(child)
    return model


def broadcast_module(model: torch.nn.Module, d: Dist, src: int = 0) -> None:
    """Every buffer from rank ``src`` (after training local BatchNorm statistics differ per rank; DDP keeps the
    parameters equal)."""
    if not d.active:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in model.buffers():
            c = t.contiguous()
            dist.broadcast(c, src)
            if c.data_ptr() != t.data_ptr():
                t.copy_(c)


def finish_models(trainer, d: Dist) -> None:
    """After the last step: every network the trainer holds (the live one, and a weight average where it keeps one
    as ``trainer.ema.model``) gets rank 0's buffers and plain ``BatchNorm2d`` layers again."""
    if not d.active:
        return
    ema = getattr(trainer, "ema", None)
    for net in [trainer.model] + ([ema.model] if ema is not None else []):
        broadcast_module(net, d)
        unwrap_model(net)


def mean_across(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of a scalar tensor over the ranks (itself on one process)."""
    if not d.active:
        return value
    import torch.distributed as dist

    v = value.detach().clone().float()
    dist.all_reduce(v)
    return v / d.world_size


def gather_rows(t: torch.Tensor, d: Dist, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's ``t`` (shards of possibly different lengths along dim 0) in rank order, on every
    rank; the result is on ``t``'s device. NCCL gathers through ``device``."""
    if not d.active:
        return t
    import torch.distributed as dist

    src = t.to(device).contiguous()
    n = torch.tensor([src.shape[0]], device=device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(d.world_size)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    m = max(sizes)
    if src.shape[0] < m:
        pad = src.new_zeros((m - src.shape[0],) + tuple(src.shape[1:]))
        src = torch.cat([src, pad], 0)
    out = [torch.empty_like(src) for _ in range(d.world_size)]
    dist.all_gather(out, src)
    return torch.cat([o[:k] for o, k in zip(out, sizes)], 0).to(t.device)


def sharded_map(fn, items: torch.Tensor, d: Dist, device: torch.device):
    """``fn`` on this rank's contiguous shard of ``items`` (:func:`shard_range`), each output tensor gathered in
    rank order: on every rank the result equals ``fn(items)`` up to batch composition.

    Args:
        fn: ``fn(items_shard) -> tensor or tuple of tensors``, each with one row per item.
        items: (N, ...) tensor.
    """
    if not d.active:
        return fn(items)
    lo, hi = shard_range(items.shape[0], d.rank, d.world_size)
    # a rank with an empty shard (fewer items than ranks) runs one item for the outputs' shapes and sends none
    out = fn(items[lo:hi]) if hi > lo else _none_of(fn(items[:1]))
    if isinstance(out, torch.Tensor):
        return gather_rows(out, d, device)
    return tuple(gather_rows(o, d, device) for o in out)


def _none_of(out):
    return out[:0] if isinstance(out, torch.Tensor) else tuple(o[:0] for o in out)


def sharded_load(paths, load, d: Dist, device: torch.device) -> torch.Tensor:
    """Decode a training set split across the ranks and gather it: rank r decodes ``paths[shard_range(...)]``
    with ``load(paths_shard) -> uint8 (n, 3, H, W)`` (cv2 or DALI), every rank ends with all N images in order.

    A rank with no file of its own (more ranks than files) decodes nothing and still joins the gather.
    """
    if not d.active:
        return load(paths)
    lo, hi = shard_range(len(paths), d.rank, d.world_size)
    part = load(paths[lo:hi]) if hi > lo else None
    # the image size is the same on every rank (the config's); a rank without files needs only the shape
    shape = torch.tensor(list(part.shape[1:]) if part is not None else [0, 0, 0], device=device)
    import torch.distributed as dist

    dist.all_reduce(shape, op=dist.ReduceOp.MAX)
    if part is None:
        part = torch.zeros((0,) + tuple(int(v) for v in shape), dtype=torch.uint8)
    return gather_rows(part, d, device)


def fault_hook(d: Dist):
    """The test hook of :data:`FAULT_ENV` as ``hook(steps_done)``, or None (unset, another rank, or a restart):
    simulates a rank dying mid-run so that the tests can check torchrun's ``--max-restarts`` resume."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or restart_count() > 0:
        return None
    rank, step = (int(v) for v in spec.split(":"))
    if rank != d.rank:
        return None

    def hook(done: int) -> None:
        if done == step:
            os._exit(13)
    return hook

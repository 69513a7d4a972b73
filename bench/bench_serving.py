"""Serving: Engine.predict called directly vs the same engine through ``fae-fast serve`` (Triton via PyTriton),
side by side: frames/s and p50/p99 latency of batch-1 requests from several concurrent clients.

* ``engine``: the K x R frames scored one by one by ``Engine.predict`` in this process (batch 1, no server): the
  floor the server's overhead is measured against;
* ``triton``: K client processes (a warm process pool: the clients of a plant run on other machines, and client
  threads here would share the GIL with the server's inference function), each sending R single-frame gRPC
  requests one after another; Triton merges the concurrent ones (dynamic batching, ``MAX_QUEUE_DELAY_US``).

Latency is per request on the client: frame on the host -> scores and map on the host (for ``triton``: the
round trip through Triton's gRPC endpoint, queue, batching and the engine). Frames/s = K x R / wall time of the
round. extra_info carries fps, p50_ms, p99_ms, the server's batch sizes and the machine.

Recorded: ``python -m pytest bench/bench_serving.py -o python_files='bench_*.py'
--benchmark-json=bench/results/serving_<machine>.json`` in the serving environment (scripts/serve_env.sh). With
``--benchmark-disable`` (CI: scripts/serve_ci.sh) a 32 x 32 model and 2 x 2 requests keep it to seconds. Skipped
where PyTriton is not installed (the main environment's bench run).
"""
from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import multiprocessing
import os
import socket
import time

import numpy as np
import pytest
import torch

if importlib.util.find_spec("pytriton") is None or importlib.util.find_spec("tritonclient") is None:
    pytest.skip("PyTriton/tritonclient not installed (the serving environment: scripts/serve_env.sh)",
                allow_module_level=True)

from bench._common import machine_info  # noqa: E402
from fae_fast.inference import Engine  # noqa: E402
from fae_fast.inference.bench import make_model  # noqa: E402

CLIENTS, REQUESTS = 4, 8  # concurrent clients x batch-1 requests each, per round
MAX_BATCH, MAX_QUEUE_DELAY_US = 8, 2000
THREADS = 2  # the engine's CPU threads, the same for both providers
ROUNDS = 3


def _quick(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def _frames(seed: int, n: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _client(url: str, seed: int, n: int, size: int) -> list[float]:
    """One client process: ``n`` single-frame requests one after another; returns their latencies (s)."""
    from fae_fast.serving.client import FaeClient

    lat = []
    with FaeClient(url) as c:
        for f in _frames(seed, n, size):
            t0 = time.perf_counter()
            c.predict(f)
            lat.append(time.perf_counter() - t0)
    return lat


@pytest.fixture(scope="module")
def setup(request):
    quick = _quick(request.config)
    size, widths, dil = (32, (8, 16), (1, 2)) if quick else (128, (16, 32, 64, 128), (1, 2, 4))
    clients, requests = (2, 2) if quick else (CLIENTS, REQUESTS)
    eng = Engine(make_model(widths, dil), image_size=(size, size), device="cpu", threads=THREADS,
                 thresholds={"image": 1e-3, "pixel": 1e-3}).warmup()
    from fae_fast.serving.server import FaeTritonServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = FaeTritonServer(eng, grpc_port=port, http_port=None, max_batch=MAX_BATCH,
                          max_queue_delay_us=MAX_QUEUE_DELAY_US, max_queue_size=64, exit_timeout_s=5).start()
    pool = cf.ProcessPoolExecutor(clients, mp_context=multiprocessing.get_context("spawn"))
    url = f"127.0.0.1:{port}"
    list(pool.map(_client, [url] * clients, range(clients), [1] * clients, [size] * clients))  # warm: imports
    yield dict(quick=quick, engine=eng, server=srv, pool=pool, url=url, size=size, widths=widths, clients=clients,
               requests=requests)
    pool.shutdown()
    srv.stop()


@pytest.mark.parametrize("provider", ["engine", "triton"])
def test_serving_batch1_concurrent_clients(benchmark, setup, provider):
    eng, size, k, r = setup["engine"], setup["size"], setup["clients"], setup["requests"]
    lats: list[float] = []
    srv = setup["server"]
    srv.batches.clear()

    def engine_round():
        for seed in range(k):
            for f in _frames(seed, r, size):
                t0 = time.perf_counter()
                eng.predict(f)
                lats.append(time.perf_counter() - t0)

    def triton_round():
        for lat in setup["pool"].map(_client, [setup["url"]] * k, range(k), [r] * k, [size] * k):
            lats.extend(lat)

    fn = engine_round if provider == "engine" else triton_round
    walls = []

    def timed():
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)

    quick = setup["quick"]
    if not quick:  # one untimed round first: connections, ONNX Runtime's first runs, the server's first batches
        fn()
        lats.clear()
        srv.batches.clear()
    load_start = os.getloadavg()
    benchmark.pedantic(timed, rounds=1 if quick else ROUNDS, iterations=1, warmup_rounds=0)
    wall = float(np.median(walls))
    ms = np.asarray(lats) * 1e3
    batches = {f"{reqs}req/{frames}fr": c for (reqs, frames), c in sorted(srv.batches.items())}
    info = machine_info()
    info.update(provider=provider, scenario=f"{k} concurrent clients x {r} batch-1 requests per round",
                image_size=size, widths=list(setup["widths"]), engine_backend=eng.backend, engine_threads=THREADS,
                max_batch=MAX_BATCH, max_queue_delay_us=MAX_QUEUE_DELAY_US, frames_per_round=k * r,
                fps=k * r / wall, p50_ms=float(np.percentile(ms, 50)), p99_ms=float(np.percentile(ms, 99)),
                requests_timed=len(lats), server_batches=batches if provider == "triton" else None,
                torch_threads=torch.get_num_threads(), machine_label=os.environ.get("FAE_FAST_MACHINE"),
                load_avg_start=list(load_start), load_avg_end=list(os.getloadavg()))
    benchmark.extra_info.update(info)
    assert len(lats) % (k * r) == 0 and len(lats) > 0

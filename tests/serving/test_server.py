"""``fae-fast serve`` against a real Triton server on the loopback interface (PyTriton, CPU).

Runs in the serving environment only (scripts/serve_ci.sh). One module-scoped server (tiny U-Net, 19 x 26 frames,
ONNX Runtime engine, dynamic batching with a 20 ms queue delay so that concurrent requests merge) serves the
concurrency and bad-frame tests; the queue and stop tests each start their own server around a slowed engine.
Results are compared to :meth:`Engine.predict` on the same frames within the engine's CPU tolerance
(``rtol=1e-5, atol=1e-8``: ONNX Runtime's convolutions may sum a batch of 1 and a merged batch in another order).
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import threading
import time

import numpy as np
import pytest
from pytriton.proxy.types import Request

from fae_fast.inference import Engine
from fae_fast.serving import schema
from fae_fast.serving.client import FaeClient, QueueFull, RequestFailed, ServingError
from fae_fast.serving.server import FaeTritonServer, python_libdir_first
from tests.helpers import assert_close
from tests.test_engine import K_SMOOTH, N_SMOOTH, H, W, tiny_model

from ._client_proc import frames_for, run_client
from .conftest import free_port

TOL = dict(atol=1e-8, rtol=1e-5)


@pytest.fixture(scope="module")
def engine():
    """The tiny engine, its thresholds set so that they split the frames of the tests (its scores lie close)."""
    eng = Engine(tiny_model(), image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu", threads=1)
    ref = eng.predict(frames_for(0, 3, H, W)[:, 0])
    return eng.set_thresholds(image=float(np.median(ref.pred_score)), pixel=float(np.quantile(ref.anomaly_map, 0.9)))


@pytest.fixture(scope="module")
def server(engine):
    srv = FaeTritonServer(engine, grpc_port=free_port(), http_port=free_port(), max_batch=16,
                          max_queue_delay_us=20_000, max_queue_size=64, exit_timeout_s=3)
    with srv:
        yield srv


def _url(srv) -> str:
    return f"127.0.0.1:{srv.grpc_port}"


def _check_equal(got, ref) -> None:
    """A served result against Engine.predict of the same frames: scores and maps within TOL, labels and masks
    equal."""
    score, label, amap, mask = got
    assert_close(score, ref.pred_score, **TOL, msg="pred_score")
    assert_close(amap, ref.anomaly_map, **TOL, msg="anomaly_map")
    assert np.array_equal(label, ref.pred_label), (label, ref.pred_label)
    assert np.array_equal(mask, ref.pred_mask)


class SlowEngine:
    """The engine, slowed to ``delay_s`` per batch (to fill the queue / to stop mid-batch); ``started`` is set when
    the first batch begins."""

    def __init__(self, engine, delay_s: float):
        self._engine, self.delay_s = engine, delay_s
        self.started = threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def predict(self, *args, **kwargs):
        self.started.set()
        time.sleep(self.delay_s)
        return self._engine.predict(*args, **kwargs)


def test_python_libdir_goes_first_on_ld_library_path():
    env = {"LD_LIBRARY_PATH": "/opt/x:/usr/lib"}
    libdir = python_libdir_first(env)
    if libdir is None:
        pytest.skip("this Python has no shared libpython")
    assert env["LD_LIBRARY_PATH"].split(":") == [libdir, "/opt/x", "/usr/lib"]
    python_libdir_first(env)  # idempotent: never listed twice
    assert env["LD_LIBRARY_PATH"].split(":").count(libdir) == 1


def test_served_results_equal_engine_grpc_and_http(server, engine):
    x = frames_for(0, 3, H, W)[:, 0]
    ref = engine.predict(x)
    assert ref.pred_label.any() and not ref.pred_label.all(), "thresholds must split these frames"
    for protocol, port in (("grpc", server.grpc_port), ("http", server.http_port)):
        with FaeClient(f"127.0.0.1:{port}", protocol=protocol) as c:
            assert c.ready()
            r = c.predict(x)
            assert r.pred_score.shape == (3,) and r.anomaly_map.shape == (3, H, W) and r.pred_mask.dtype == np.bool_
            _check_equal((r.pred_score, r.pred_label, r.anomaly_map, r.pred_mask), ref)


def test_per_request_thresholds(server, engine):
    x = frames_for(1, 4, H, W)[:, 0]
    ref = engine.predict(x)
    it, pt = float(np.median(ref.pred_score)), float(np.quantile(ref.anomaly_map, 0.9))
    with FaeClient(_url(server)) as c:
        r = c.predict(x, image_threshold=it, pixel_threshold=pt)
    assert np.array_equal(r.pred_label, ref.pred_score > it) and r.pred_label.sum() == 2
    assert np.array_equal(r.pred_mask, ref.anomaly_map > pt)


def test_concurrent_threads_get_their_own_results_and_requests_are_batched(server, engine):
    n_clients, per_client = 8, 3
    before = sum(c for (reqs, _), c in server.batches.items() if reqs > 1)

    def client(seed):
        return run_client(_url(server), seed, per_client, H, W)

    with cf.ThreadPoolExecutor(n_clients) as pool:
        results = list(pool.map(client, range(100, 100 + n_clients)))
    for seed, res in zip(range(100, 100 + n_clients), results):
        for f, got in zip(frames_for(seed, per_client, H, W), res):
            _check_equal(got, engine.predict(f))
    merged = sum(c for (reqs, _), c in server.batches.items() if reqs > 1) - before
    assert merged > 0, f"no batch merged two requests: {dict(server.batches)}"


def test_concurrent_processes_get_their_own_results(server, engine):
    n_procs, per_client = 2, 3
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(n_procs, mp_context=ctx) as pool:
        futs = {seed: pool.submit(run_client, _url(server), seed, per_client, H, W) for seed in (200, 201)}
        results = {seed: f.result(timeout=120) for seed, f in futs.items()}
    for seed, res in results.items():
        assert len(res) == per_client
        for f, got in zip(frames_for(seed, per_client, H, W), res):
            _check_equal(got, engine.predict(f))


def test_a_bad_request_fails_alone_in_its_batch(server, engine):
    """One Triton batch of three requests (the infer function called as Triton calls it): the request with a NaN
    threshold gets its error and fail-safe outputs, the others their results."""
    x = frames_for(3, 3, H, W)[:, 0]
    reqs = [Request({schema.FRAMES: x[:2]}),
            Request({schema.FRAMES: x[2:], schema.IMAGE_THRESHOLD: np.array([[np.nan]], np.float32)}),
            Request({schema.FRAMES: x[:1, :, :-1]})]  # wrong width: Triton refuses it first; checked here too
    out = server._infer(reqs)
    ref = engine.predict(x[:2])
    _check_equal((out[0]["pred_score"][:, 0], out[0]["pred_label"][:, 0], out[0]["anomaly_map"],
                  out[0]["pred_mask"]), ref)
    assert list(out[0]["error"].ravel()) == [b"", b""]
    for i, what in ((1, "image_threshold must be a finite number"), (2, f"must have shape (B, {H}, {W}, 3)")):
        assert what in out[i]["error"][0, 0].decode(), out[i]["error"]
        assert out[i]["pred_label"].all() and out[i]["pred_mask"].all()  # fail safe: never good
        assert np.isnan(out[i]["pred_score"]).all() and np.isnan(out[i]["anomaly_map"]).all()


def test_bad_frames_over_the_wire_fail_only_their_request(server, engine):
    x = frames_for(4, 1, H, W)[0]
    ref = engine.predict(x)
    bad = {"size": lambda c: c.predict(np.zeros((1, H, W - 2, 3), np.uint8)),
           "channels": lambda c: c.predict(np.zeros((1, H, W, 1), np.uint8)),
           "dtype": lambda c: c.infer_raw(np.zeros((1, H, W, 3), np.float32)),
           "nan threshold": lambda c: c.predict(x, pixel_threshold=float("nan"))}
    with FaeClient(_url(server)) as c0:
        raw = c0.infer_raw(x, image_threshold=float("inf"))  # a client that ignores `error` still sees "anomalous"
    assert raw["pred_label"].all() and b"finite" in raw["error"][0, 0]

    def call(kind):
        with FaeClient(_url(server)) as c:
            if kind == "good":
                r = c.predict(x)
                return r.pred_score, r.pred_label, r.anomaly_map, r.pred_mask
            return bad[kind](c)

    kinds = ["good", *bad, "good"]
    with cf.ThreadPoolExecutor(len(kinds)) as pool:
        futs = [pool.submit(call, k) for k in kinds]
    for kind, fut in zip(kinds, futs):
        if kind == "good":
            _check_equal(fut.result(), ref)
        else:
            with pytest.raises(RequestFailed) as err:
                fut.result()
            msg = str(err.value)
            assert {"size": "unexpected shape", "channels": "unexpected shape", "dtype": "expects 'UINT8'",
                    "nan threshold": "pixel_threshold must be a finite number"}[kind] in msg, msg


def test_a_full_queue_rejects_with_a_clear_error(engine, ports):
    slow = SlowEngine(engine, delay_s=0.4)
    x = frames_for(5, 1, H, W)[0]
    with FaeTritonServer(slow, **ports, max_batch=1, max_queue_delay_us=0, max_queue_size=1, exit_timeout_s=3) as srv:
        def call(_):
            with FaeClient(f"127.0.0.1:{srv.grpc_port}") as c:
                try:
                    return c.predict(x)
                except QueueFull as exc:
                    return exc

        with cf.ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(call, range(6)))
    full = [o for o in outs if isinstance(o, QueueFull)]
    ok = [o for o in outs if not isinstance(o, QueueFull)]
    assert full and ok, outs  # one running + one queued are answered, the rest refused at once
    assert all("queue is full" in str(e) and "--max-queue-size" in str(e) for e in full), full[0]
    ref = engine.predict(x)
    for r in ok:
        _check_equal((r.pred_score, r.pred_label, r.anomaly_map, r.pred_mask), ref)


def test_stop_with_requests_in_flight_answers_or_fails_each(engine, ports):
    """5 requests of 0.4 s each, one at a time, and a stop (2 s exit timeout) once the first began; 2 more requests
    sent while the server stops. Each of the 7 comes back, none hangs: the running batch is answered with the
    right result, every other one either answered correctly or failed with a ServingError naming the server (what
    Triton does with the queue at stop is its choice: 2.5x drains it), and the late ones fail."""
    slow = SlowEngine(engine, delay_s=0.4)
    x = frames_for(6, 1, H, W)[0]
    ref = engine.predict(x)
    srv = FaeTritonServer(slow, **ports, max_batch=1, max_queue_delay_us=0, max_queue_size=16,
                          exit_timeout_s=2).start()
    url = f"127.0.0.1:{srv.grpc_port}"

    def call(_):
        with FaeClient(url, timeout_s=60) as c:
            try:
                return c.predict(x)
            except ServingError as exc:
                return exc

    pool = cf.ThreadPoolExecutor(7)
    try:
        futs = [pool.submit(call, i) for i in range(5)]
        assert slow.started.wait(30), "the first batch never started"
        time.sleep(0.1)  # the others are queued behind it
        t0 = time.perf_counter()
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        time.sleep(0.5)
        late = [pool.submit(call, i) for i in range(2)]
        outs = [f.result(timeout=60) for f in futs]  # each one comes back: none hangs
        late_outs = [f.result(timeout=60) for f in late]
        stopper.join(60)
        stop_s = time.perf_counter() - t0
    finally:
        srv.stop()
        pool.shutdown(wait=False)
    answered = [o for o in outs if not isinstance(o, ServingError)]
    failed = [o for o in outs if isinstance(o, ServingError)]
    print(f"stop in {stop_s:.1f} s: {len(answered)} answered, {len(failed)} failed; late: {late_outs}")
    assert not stopper.is_alive()
    assert not isinstance(outs[0], ServingError), f"the batch running at stop was not answered: {outs[0]}"
    for r in answered:  # an answer is a real one
        _check_equal((r.pred_score, r.pred_label, r.anomaly_map, r.pred_mask), ref)
    assert all(str(e).startswith(url) for e in failed), failed
    assert all(isinstance(e, ServingError) and str(e).startswith(url) for e in late_outs), late_outs

"""InlineStream on the CPU: order, opportunistic batching, back-pressure, shutdown flush, per-frame errors.

The engine's ``run`` is wrapped with a gate (a threading.Event) where a test needs the worker to be busy, so the
timing-dependent behaviour is deterministic.
"""
import threading
import time

import numpy as np
import pytest
import torch

from fae_fast.inference import Engine, FrameError, InlineStream, QueueFull, StreamClosed
from tests.helpers import assert_close
from tests.test_engine import K_SMOOTH, N_SMOOTH, H, W, frames, tiny_model


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model(), image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device="cpu",
                  thresholds={"image": 1e-3, "pixel": 5e-4})


@pytest.fixture(scope="module")
def camera():
    """12 camera frames (H, W, 3) uint8 and the engine's results for them, computed in one batch."""
    x = frames(12, seed=21)
    return [np.ascontiguousarray(f.permute(1, 2, 0).numpy()) for f in x], x


class Gate:
    """Wraps engine.run: each call records its batch size and waits until the gate is open."""

    def __init__(self, engine, monkeypatch, fail_on_call=None):
        self.open = threading.Event()
        self.entered = threading.Event()
        self.sizes = []
        self.fail_on_call = fail_on_call
        real = engine.run

        def run(x):
            self.sizes.append(x.shape[0])
            self.entered.set()
            assert self.open.wait(10), "gate never opened"
            if self.fail_on_call is not None and len(self.sizes) == self.fail_on_call:
                raise RuntimeError("injected engine failure")
            return real(x)

        monkeypatch.setattr(engine, "run", run)


def drain(stream, n, timeout=10):
    return [stream.get(timeout=timeout) for _ in range(n)]


def test_results_in_order_and_equal_to_predict(engine, camera):
    imgs, x = camera
    ref = engine.predict(x)
    with InlineStream(engine, max_batch=4, max_delay_ms=2, return_map=True) as s:
        idx = [s.submit(f) for f in imgs[:5]]
        idx += s.submit_many(imgs[5:])  # a burst
        got = drain(s, 12)
    assert idx == list(range(12)) and [r.index for r in got] == idx
    for r in got:
        assert abs(r.pred_score - float(ref.pred_score[r.index])) <= 1e-6 * max(1.0, r.pred_score)
        assert r.pred_label == bool(ref.pred_label[r.index])
        assert np.array_equal(r.pred_mask, ref.pred_mask[r.index].numpy())
        assert_close(torch.from_numpy(r.anomaly_map), ref.anomaly_map[r.index], rtol=1e-5, atol=1e-8)
        assert 1 <= r.batch_size <= 4 and r.latency_ms >= 0
    assert s.stats["frames"] == 12 and max(s.stats["batch_sizes"]) <= 4


def test_opportunistic_batching(engine, camera, monkeypatch):
    imgs, _ = camera
    gate = Gate(engine, monkeypatch)
    s = InlineStream(engine, max_batch=4, max_delay_ms=0)
    s.submit(imgs[0])
    assert gate.entered.wait(5)  # the worker took frame 0 alone (nothing else queued, no delay budget)
    for f in imgs[1:7]:  # queue up while the worker is busy
        s.submit(f)
    gate.open.set()
    got = drain(s, 7)
    s.close()
    assert [r.index for r in got] == list(range(7))
    assert gate.sizes == [1, 4, 2]  # then as many as were queued, up to max_batch
    assert [r.batch_size for r in got] == [1, 4, 4, 4, 4, 2, 2]


def test_delay_budget_collects_companions(engine, camera):
    imgs, _ = camera
    with InlineStream(engine, max_batch=8, max_delay_ms=500) as s:
        t0 = time.perf_counter()
        for f in imgs[:3]:
            s.submit(f)
        got = drain(s, 3)
    assert [r.batch_size for r in got] == [3, 3, 3]  # waited for companions within the budget
    assert time.perf_counter() - t0 < 5


def test_backpressure_raise(engine, camera, monkeypatch):
    imgs, _ = camera
    gate = Gate(engine, monkeypatch)
    s = InlineStream(engine, max_batch=2, max_delay_ms=0, capacity=3, on_full="raise")
    for f in imgs[:3]:
        s.submit(f)
    with pytest.raises(QueueFull, match="capacity 3"):
        s.submit(imgs[3])
    assert s.pending() == 3
    gate.open.set()
    assert s.get(timeout=10).index == 0  # delivering one result makes room for one frame
    assert s.submit(imgs[3]) == 3  # the refused frame was not counted: indices stay dense
    s.close()
    assert [r.index for r in s] == [1, 2, 3]


def test_backpressure_block_with_timeout_then_unblock(engine, camera, monkeypatch):
    imgs, _ = camera
    gate = Gate(engine, monkeypatch)
    s = InlineStream(engine, max_batch=2, max_delay_ms=0, capacity=2)
    s.submit(imgs[0])
    s.submit(imgs[1])
    t0 = time.perf_counter()
    with pytest.raises(QueueFull, match="after 0.2 s"):
        s.submit(imgs[2], timeout=0.2)
    assert time.perf_counter() - t0 >= 0.19
    done = []
    t = threading.Thread(target=lambda: done.append(s.submit(imgs[2])))  # blocks without timeout
    t.start()
    time.sleep(0.1)
    assert t.is_alive() and not done
    gate.open.set()
    assert s.get(timeout=10).index == 0
    t.join(10)
    assert done == [2]
    s.close()
    assert [r.index for r in s] == [1, 2]


def test_close_flushes_every_pending_frame(engine, camera, monkeypatch):
    imgs, _ = camera
    gate = Gate(engine, monkeypatch)
    s = InlineStream(engine, max_batch=16, max_delay_ms=60_000, capacity=64)  # a delay no test waits for
    for f in imgs:
        s.submit(f)
    gate.open.set()
    t0 = time.perf_counter()
    s.close()  # closing cuts the delay budget short and processes everything
    assert time.perf_counter() - t0 < 10
    assert [r.index for r in s] == list(range(12))
    with pytest.raises(StreamClosed):
        s.submit(imgs[0])
    with pytest.raises(StreamClosed):
        s.get(timeout=1)


def test_bad_frames_become_errors_at_their_index(engine, camera):
    imgs, _ = camera
    bad_shape = np.zeros((H, W - 1, 3), np.uint8)
    bad_dtype = imgs[0].astype(np.float32)
    with InlineStream(engine, max_batch=8, max_delay_ms=50) as s:
        for f in (imgs[0], imgs[1], bad_shape, bad_dtype, imgs[2], "not a frame", torch.from_numpy(imgs[3])
                  .permute(2, 0, 1)):
            s.submit(f)
        assert s.get(timeout=10).index == 0
        assert s.get(timeout=10).index == 1
        with pytest.raises(FrameError, match=r"frame 2: shape \(19, 25, 3\)") as e:
            s.get(timeout=10)
        assert e.value.index == 2 and isinstance(e.value.__cause__, ValueError)
        with pytest.raises(FrameError, match="frame 3: dtype float32") as e:
            s.get(timeout=10)
        assert isinstance(e.value.__cause__, TypeError)
        assert s.get(timeout=10).index == 4
        with pytest.raises(FrameError, match="frame 5"):
            s.get(timeout=10)
        assert s.get(timeout=10).index == 6  # a torch (C, H, W) frame
        assert s._launcher.is_alive() and s._completer.is_alive()
        s.submit(imgs[4])
        assert s.get(timeout=10).index == 7


def test_grey_frame_is_copied_at_submit(engine, camera, monkeypatch):
    """copy_frames=True: a grey frame's buffer may be reused right after submit (no view of it is queued)."""
    imgs, _ = camera
    grey = np.ascontiguousarray(imgs[1][:, :, 0])
    grey_hw1 = np.ascontiguousarray(imgs[2][:, :, 1:2])
    ref = engine.predict(torch.from_numpy(np.stack([np.repeat(grey[:, :, None], 3, axis=2),
                                                    np.repeat(grey_hw1, 3, axis=2)])).permute(0, 3, 1, 2))
    gate = Gate(engine, monkeypatch)
    s = InlineStream(engine, max_batch=4, max_delay_ms=0, return_map=True)
    s.submit(imgs[0])
    assert gate.entered.wait(5)  # the worker is busy: the grey frames stay queued
    s.submit(grey)
    s.submit(grey_hw1)
    grey[:] = 255 - grey  # the caller reuses its buffers at once
    grey_hw1[:] = 0
    gate.open.set()
    got = drain(s, 3)
    s.close()
    for r, i in zip(got[1:], range(2)):
        assert abs(r.pred_score - float(ref.pred_score[i])) <= 1e-6 * max(1.0, r.pred_score)
        assert_close(torch.from_numpy(r.anomaly_map), ref.anomaly_map[i], rtol=1e-5, atol=1e-8)


def test_poll_stops_at_a_failed_frame(engine, camera):
    imgs, _ = camera
    s = InlineStream(engine, max_batch=8, max_delay_ms=50)
    s.submit(imgs[0])
    s.submit(np.zeros((2, 2), np.uint8))
    s.submit(imgs[1])
    s.flush(timeout=10)
    assert [r.index for r in s.poll()] == [0]
    with pytest.raises(FrameError, match="frame 1"):
        s.poll()
    assert [r.index for r in s.poll()] == [2]
    s.close()


def test_engine_failure_is_reported_for_its_batch_only(engine, camera, monkeypatch):
    imgs, _ = camera
    gate = Gate(engine, monkeypatch, fail_on_call=2)
    gate.open.set()
    s = InlineStream(engine, max_batch=2, max_delay_ms=0)
    s.submit(imgs[0])
    assert s.get(timeout=10).index == 0
    s.submit(imgs[1])
    with pytest.raises(FrameError, match=r"frame 1: its batch \(frames \[1\]\) failed: RuntimeError: injected") \
            as e:
        s.get(timeout=10)
    assert isinstance(e.value.__cause__, RuntimeError)
    s.submit(imgs[2])
    assert s.get(timeout=10).index == 2  # the worker lives on
    s.close()


def test_callback_mode_and_callback_errors(engine, camera):
    imgs, _ = camera
    seen = []
    s = InlineStream(engine, max_batch=4, max_delay_ms=1, capacity=2, on_result=lambda r: seen.append(r.index))
    for f in imgs[:9]:  # capacity 2: submit blocks until the callback has taken earlier results
        s.submit(f, timeout=10)
    s.close()
    assert seen == list(range(9))

    def boom(r):
        raise KeyError("callback bug")

    s = InlineStream(engine, on_result=boom)
    s.submit(imgs[0])
    s.submit(imgs[1])
    with pytest.raises(RuntimeError, match="on_result raised") as e:
        s.close()
    assert isinstance(e.value.__cause__, KeyError)


def test_stream_thresholds(engine, camera):
    imgs, x = camera
    ref = engine.predict(x[:2])
    thr = float(ref.pred_score.mean())
    with InlineStream(engine, max_delay_ms=0, image_threshold=thr, pixel_threshold=None) as s:
        s.submit(imgs[0])
        r0 = s.get(timeout=10)
        s.set_thresholds(image=1e9, pixel=0.0)
        s.submit(imgs[1])
        r1 = s.get(timeout=10)
    assert r0.pred_label == (float(ref.pred_score[0]) > thr) and r0.pred_mask is not None  # engine's pixel thr
    assert r1.pred_label is False and r1.pred_mask.all() and r1.anomaly_map is None


def test_constructor_validation(engine):
    with pytest.raises(TypeError, match="Engine"):
        InlineStream(object())
    with pytest.raises(ValueError, match="max_batch"):
        InlineStream(engine, max_batch=0)
    with pytest.raises(ValueError, match="on_full"):
        InlineStream(engine, on_full="drop")
    with pytest.raises(ValueError, match="input_dtype"):
        InlineStream(engine, input_dtype=np.int16)


def cuda_engine() -> Engine:
    """The tiny engine of these tests on CUDA, with CUDA graphs for batches 1..8 (also used by test_failsafe)."""
    return Engine(tiny_model(), image_size=(H, W), n=N_SMOOTH, k=K_SMOOTH, device=torch.device("cuda"),
                  batch_sizes=(1, 2, 4, 8), thresholds={"image": 1e-3, "pixel": 5e-4})


@pytest.mark.gpu
def test_cuda_stream_overlapped_matches_predict():
    eng = cuda_engine()
    x = frames(40, seed=23)
    ref = eng.predict(x)
    imgs = [np.ascontiguousarray(f.permute(1, 2, 0).numpy()) for f in x]
    with InlineStream(eng, max_batch=8, max_delay_ms=0.2, return_map=True, depth=3) as s:
        s.submit_many(imgs[:3])
        got = drain(s, 3)
        s.submit_many(imgs[3:])
        s.submit(np.zeros((3, 3), np.uint8))
        got += drain(s, 37)
        with pytest.raises(FrameError, match="frame 40"):
            s.get(timeout=10)
    assert [r.index for r in got] == list(range(40))
    for r in got:
        assert abs(r.pred_score - float(ref.pred_score[r.index])) <= 1e-6 + 1e-3 * r.pred_score
        assert np.array_equal(r.pred_mask, ref.pred_mask[r.index].numpy()) or \
            (r.pred_mask != ref.pred_mask[r.index].numpy()).mean() < 1e-3  # padding changes nothing but rounding
        np.testing.assert_allclose(r.anomaly_map, ref.anomaly_map[r.index].numpy(), rtol=1e-3, atol=1e-7)


class SlowEngine:
    """Wraps engine.run with a sleep per batch: an engine slower than the camera."""

    def __init__(self, engine, monkeypatch, seconds):
        real = engine.run

        def run(x):
            time.sleep(seconds)
            return real(x)

        monkeypatch.setattr(engine, "run", run)


def run_in_thread(fn, timeout):
    """Run ``fn`` in a daemon thread; fail (instead of hanging the suite) when it does not finish in time."""
    out, errors = [], []

    def target():
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the test's thread
            errors.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"did not finish within {timeout} s (deadlock)"
    if errors:
        raise errors[0]
    return out[0]


def test_single_thread_camera_loop_never_deadlocks(engine, camera, monkeypatch):
    """The module docstring's loop, one thread doing submit() then poll(), default capacity 64 and on_full="block",
    an engine slower than the camera: it used to block for ever at frame 65 with 64 results in the outbox."""
    imgs, x = camera
    ref = engine.predict(x)
    SlowEngine(engine, monkeypatch, 0.03)
    n = 150

    def camera_loop():
        got = []
        with InlineStream(engine) as stream:
            assert stream.capacity == 64 and stream.on_full == "block"
            for i in range(n):
                stream.submit(imgs[i % len(imgs)])
                got += stream.poll()
        return got + list(stream)  # the frames flushed by close()

    got = run_in_thread(camera_loop, timeout=30)
    assert [r.index for r in got] == list(range(n))  # every frame answered once, in order
    for r in got:
        assert abs(r.pred_score - float(ref.pred_score[r.index % len(imgs)])) <= 1e-6 * max(1.0, r.pred_score)


def test_single_thread_burst_larger_than_capacity(engine, camera, monkeypatch):
    """submit_many of more frames than the capacity, then read, all on one thread: finishes, nothing lost."""
    imgs, _ = camera
    SlowEngine(engine, monkeypatch, 0.01)

    def burst():
        with InlineStream(engine, max_batch=4, max_delay_ms=0, capacity=5) as s:
            idx = s.submit_many(imgs * 2)
            return idx, drain(s, len(idx))

    idx, got = run_in_thread(burst, timeout=30)
    assert idx == list(range(24)) and [r.index for r in got] == idx


def test_backpressure_against_a_reader_thread(engine, camera, monkeypatch):
    """With another thread reading, submit still waits for that reader: undelivered frames never exceed capacity."""
    imgs, _ = camera
    s = InlineStream(engine, max_batch=4, max_delay_ms=0, capacity=3)
    got, peak = [], []

    def reader():
        for r in s:
            time.sleep(0.02)  # a slow consumer: the engine is faster
            got.append(r.index)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    deadline = time.perf_counter() + 10
    while not s._readers and time.perf_counter() < deadline:  # the reader has entered get()
        time.sleep(0.001)
    for i in range(20):
        s.submit(imgs[i % len(imgs)], timeout=10)
        peak.append(s.pending())
    s.close()
    t.join(10)
    assert not t.is_alive() and got == list(range(20))
    assert max(peak) <= 3

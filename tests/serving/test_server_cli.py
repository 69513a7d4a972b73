"""``fae-fast serve`` as a user runs it: a separate process, no LD_LIBRARY_PATH set up beforehand (the command puts
the interpreter's library folder first itself), served results equal to Engine.predict, SIGTERM stops it cleanly.
Runs in the serving environment only (scripts/serve_ci.sh)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fae_fast.checkpoint import save_model_file
from fae_fast.config import FAEConfig
from fae_fast.inference import Engine
from fae_fast.serving.client import FaeClient
from tests.helpers import assert_close
from tests.test_engine import H, W, tiny_model

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_fae_fast_serve_command(tmp_path):
    cfg = FAEConfig()
    cfg.model.widths, cfg.model.dilations = (8, 16), (1, 2)
    cfg.map.normalize = "none"
    model = save_model_file(tmp_path / "m.fae", model_state=tiny_model(seed=3).state_dict(), config=cfg,
                            image_size=(H, W), thresholds={"image": 2e-3, "pixel": 1.8e-3})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fae_fast.cli", "serve", "--model", str(model), "--device", "cpu",
                             "--grpc-port", str(port), "--http-port", "0", "--max-batch", "4", "--threads", "1"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = FaeClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        while not client.ready():
            assert proc.poll() is None, f"fae-fast serve exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "fae-fast serve not ready within 120 s"
            time.sleep(0.3)
        x = np.random.default_rng(0).integers(0, 256, (2, H, W, 3), dtype=np.uint8)
        got = client.predict(x)
        client.close()
        ref = Engine.from_model_file(model, device="cpu").predict(x)
        assert_close(got.pred_score, ref.pred_score, atol=1e-8, rtol=1e-5, msg="score")
        assert np.array_equal(got.pred_label, ref.pred_label)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert f"serving {model} as model 'fae'" in out and f"gRPC 127.0.0.1:{port}" in out, out[-3000:]
    assert "fae-fast serve: stopped (1 batches, 2 frames served)" in out, out[-3000:]

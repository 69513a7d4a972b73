"""A client process of the serving tests (spawned: imports only numpy and the client)."""
import numpy as np


def frames_for(seed: int, n: int, h: int, w: int) -> np.ndarray:
    """``n`` single-frame batches (n, 1, h, w, 3) uint8, the same for the same seed in any process."""
    return np.random.default_rng(seed).integers(0, 256, (n, 1, h, w, 3), dtype=np.uint8)


def run_client(url: str, seed: int, n: int, h: int, w: int) -> list[tuple]:
    """Send ``n`` single-frame requests; returns [(score, label, map, mask), ...]."""
    from fae_fast.serving.client import FaeClient

    out = []
    with FaeClient(url) as client:
        for f in frames_for(seed, n, h, w):
            r = client.predict(f)
            out.append((r.pred_score, r.pred_label, r.anomaly_map, r.pred_mask))
    return out

"""Accuracy of the model presets side by side, on the synthetic demo data (or any MVTec-layout folder).

    python bench/presets_accuracy.py --presets tiny,fast,default --steps 400 --json bench/results/presets_<machine>.json

Each preset trains with the demo's recipe (batch 8, the data's size) and is evaluated on the test split; the
JSON holds the metrics, the training time and the machine. Throughput of the same presets is in
``bench/bench_presets.py``.
"""
import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from fae_fast import _atomic
from fae_fast.api import Detector
from fae_fast.cli import demo_config
from fae_fast.config import preset
from fae_fast.synthetic import make_dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny,fast,default")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--data", help="MVTec-layout folder (default: the synthetic demo data, generated)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else make_dataset(Path(tmp) / "data", seed=0)
        rows = []
        for name in args.presets.split(","):
            cfg = demo_config(args.steps)
            cfg.model = preset(name).model
            t0 = time.perf_counter()
            det = Detector(cfg, device=args.device).fit(data / "train" / "good", progress=False)
            train_s = time.perf_counter() - t0
            res = det.evaluate(data)["overall"]
            row = {"preset": name, "widths": list(cfg.model.widths), "steps": args.steps,
                   "train_seconds": round(train_s, 1),
                   **{k: res[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1max")}}
            print(row, flush=True)
            rows.append(row)
    _atomic.write_json(args.json, {"data": str(args.data or "synthetic demo data (seed 0)"),
                                   "machine": {"node": platform.node(), "gpu": torch.cuda.get_device_name()
                                               if torch.cuda.is_available() else None,
                                               "threads": torch.get_num_threads(), "torch": torch.__version__},
                                   "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

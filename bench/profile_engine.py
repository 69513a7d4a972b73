"""torch.profiler summary of fae_fast's inference engine at one batch size (so that a missed throughput target
comes with a profile): wall vs device-busy time per call and the top-20 CUDA kernels, with the engine's CUDA
graphs and without them (the compiled pipeline launched op by op).

Run: ``python -m bench.profile_engine --out DIR`` (CUDA: the benchmark's U-Net 64-512 at 256^2, batch 64);
``--quick`` on the CPU: a tiny U-Net at 32^2, batch 2, no compile (to test the script).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from bench._common import profile_table, sync
from fae_fast.inference import Engine
from fae_fast.inference.bench import make_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for engine_profile.txt")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny U-Net at 32^2, batch 2, 2 calls (CPU plumbing check)")
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    widths, dilations, size, batch, calls = (64, 128, 256, 512), (1, 2, 4, 8), args.size, args.batch, args.calls
    if args.quick:
        widths, dilations, size, batch, calls = (8, 16), (1, 2), 32, 2, 2
    model = make_model(widths, dilations)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=dev)
    x = x.contiguous(memory_format=torch.channels_last)
    parts = []
    for graphs in ((True, False) if dev.type == "cuda" else (False,)):
        t0 = time.perf_counter()
        eng = Engine(model, image_size=(size, size), n=4, k=7, device=dev, batch_sizes=(batch,), cuda_graphs=graphs)
        for _ in range(3):  # compilation, capture, cuDNN autotuning
            eng.run(x)
        sync(dev)
        build_s = time.perf_counter() - t0
        try:
            text = profile_table(lambda: eng.run(x), calls, dev)
        except Exception as exc:  # keep the other half's profile
            text = f"profiling failed: {type(exc).__name__}: {exc}"
        parts.append(f"== engine {widths} {size}^2 batch {batch} on {dev}, cuda_graphs={graphs}, backend "
                     f"{eng.backend}, map {eng.map_backend}; build + 3 calls {build_s:.1f} s\n{text}\n")
        print(parts[-1], flush=True)
        del eng
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "engine_profile.txt"), "w") as f:
        f.write("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

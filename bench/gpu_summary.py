"""Summary of one ``bench/gpu_check.sh`` run, rewritten after every step so that a run cut short still says
what it did: the machine and commit, each step's rc and seconds, and every GPU target of docs/RESULTS.md with
the number measured (or why there is none).

    python3 bench/gpu_summary.py machine WORK     # WORK/machine.json: GPU, driver, versions, commit, tree hash
    python3 bench/gpu_summary.py summary WORK OUT # OUT/summary.json and OUT/summary.txt from WORK's results

Imports no torch in ``summary`` (it runs after every step); reads the pytest-benchmark JSON files and the
``fae-fast bench`` JSON files the script writes into WORK.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:
        return f"({cmd[0]}: {exc})"


def machine(work: str) -> dict:
    import torch

    info = {"host": platform.node(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "commit": os.environ.get("FAE_FAST_COMMIT", "unknown"), "tree_hash": os.environ.get("TREE_HASH"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                "clocks.max.mem,power.limit", "--format=csv,noheader"])}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"unavailable: {exc}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), l2_mib=getattr(p, "L2_cache_size", 0) / 2**20)
    else:
        info["gpu"] = None
    for mod in ("cv2", "pytest_benchmark", "xdist", "nvidia.dali", "onnxruntime"):
        try:
            m = __import__(mod, fromlist=["_"])
            info[mod] = getattr(m, "__version__", "present")
        except Exception:
            info[mod] = None
    with open(os.path.join(work, "machine.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


# ------------------------------------------------------------------------------------------------------------

def _load(work: str, name: str):
    path = os.path.join(work, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except Exception:
        return None


def _bench(data, test: str, **params) -> dict | None:
    """The pytest-benchmark entry of ``test`` whose params include ``params``: extra_info plus median_s."""
    for b in (data or {}).get("benchmarks", []):
        if b["name"].split("[")[0] == test and all((b.get("params") or {}).get(k) == v for k, v in params.items()):
            return dict(b.get("extra_info") or {}, median_s=b["stats"]["median"])
    return None


def _row(data, provider: str, scenario: str, batch: int | None = None) -> dict | None:
    for r in (data or {}).get("rows", []):
        if r["provider"] == provider and r["scenario"] == scenario and batch in (None, r["batch"]):
            return r
    return None


def targets(work: str) -> list[dict]:
    """Each claim of docs/RESULTS.md's "Not yet measured on a GPU" table with what this run measured."""
    out = []

    def add(claim, target, measured, met, source):
        out.append({"claim": claim, "target": target, "measured": measured, "met": met, "source": source})

    ops, opc = _load(work, "ops.json"), _load(work, "ops_compiled.json")
    from fae_fast.config import MAP_ERRORS

    for op, test, kind in ([("anomaly_map", "test_anomaly_map", e) for e in MAP_ERRORS]
                           + [("corrupt_and_noise", "test_corrupt_and_noise", None),
                              ("noisy_target_loss", "test_noisy_target_loss", None)]):
        by_kind = {} if kind is None else {"error": kind}
        tri = (_bench(ops, test, provider="triton", batch=64, size=256, **by_kind)
               or _bench(ops, test, provider="triton", **by_kind))
        if tri is None:
            add(f"{op} batch 64, 256^2, bf16 (triton)", "see RESULTS.md", None, None, "ops.json: missing")
            continue
        case = {"batch": tri.get("batch"), "size": tri.get("size"), **by_kind}  # 64, 256 but on the CPU (CPU_SMOKE)
        ref = _bench(ops, test, provider="torch", **case)
        comp = _bench(opc, test, provider="torch_compile", **case)
        ms = tri["median_s"] * 1e3
        parts = [f"triton {ms:.4f} ms", f"floor {tri.get('floor_ms', float('nan')):.4f} ms"]
        if ref:
            parts.append(f"eager {ref['median_s'] * 1e3:.4f} ms")
        speedup = comp["median_s"] / tri["median_s"] if comp else None
        if comp:
            parts.append(f"compiled {comp['median_s'] * 1e3:.4f} ms ({speedup:.1f}x)")
        if op == "anomaly_map":
            add(f"anomaly_map ({kind}) n=4 k=7, batch {case['batch']}, {case['size']}^2", "<= 0.05 ms",
                ", ".join(parts), ms <= 0.05, "ops.json, ops_compiled.json")
        else:
            floor = tri.get("floor_ms")
            met = None if not floor or speedup is None else (ms <= 1.5 * floor and speedup >= 3)
            add(f"{op} batch {case['batch']}, {case['size']}^2", "<= 1.5x memory floor, >= 3x compiled reference",
                ", ".join(parts),
                met, "ops.json, ops_compiled.json")

    cor = _load(work, "corruption.json")
    ext, tor, loop = (_bench(cor, "test_corruption_throughput", provider=p)
                      for p in ("batched_ext", "batched_torch", "draem_loop"))
    best = max((b for b in (ext, tor) if b), key=lambda b: b.get("img_per_s", 0), default=None)
    if best:
        ratio = best["img_per_s"] / loop["img_per_s"] if loop else None
        add(f"corruption generator, batch {best.get('batch')}", ">= 20,000 img/s, >= 50x a per-image loop",
            f"{best['provider']} {best['img_per_s']:.0f} img/s" + (f", torch ops {tor['img_per_s']:.0f}" if tor else "")
            + (f", loop {loop['img_per_s']:.0f} img/s ({ratio:.1f}x)" if loop else ""),
            best["img_per_s"] >= 20000 and (ratio is None or ratio >= 50), "corruption.json")
    else:
        add("corruption generator, batch 256", ">= 20,000 img/s", None, None, "corruption.json: missing")
    ew_ext = _bench(cor, "test_elastic_warp_full", provider="ext")
    ew_ref = _bench(cor, "test_elastic_warp_full", provider="torch")
    if ew_ext and ew_ref:
        r = ew_ref["median_s"] / ew_ext["median_s"]
        add("elastic_warp CUDA (field + warp)", ">= 3x the grid_sample reference",
            f"ext {ew_ext['median_s'] * 1e3:.3f} ms, reference {ew_ref['median_s'] * 1e3:.3f} ms ({r:.1f}x)", r >= 3,
            "corruption.json")

    tr = _load(work, "train_step.json")
    fae, plain = _bench(tr, "test_train_step", provider="fae_fast"), _bench(tr, "test_train_step", provider="plain")
    if fae and "img_per_s" in fae:
        add(f"training step, batch {fae.get('batch')}, corruption + noise", ">= 1,200 img/s",
            f"{fae['img_per_s']:.0f} img/s" + (f" (plain U-Net step {plain['img_per_s']:.0f} img/s)"
                                               if plain and "img_per_s" in plain else ""),
            fae["img_per_s"] >= 1200, "train_step.json, train_step_*_profile.txt")
    else:
        add("training step, batch 32, corruption + noise", ">= 1,200 img/s", None, None, "train_step.json: missing")

    eng, comp = _load(work, "engine.json"), _load(work, "engine_compiled.json")
    r = _row(eng, "engine", "gpu_resident", 64)
    c = _row(comp, "compiled_bf16", "gpu_resident", 64)
    add("U-Net 64-512 + map + score, batch 64 GPU-resident", ">= 6,000 img/s (plain compiled bf16 ~ 4,100)",
        None if r is None else f"engine {r['img_per_s']:.0f} img/s" + (
            f", compiled bf16 {c['img_per_s']:.0f} img/s ({r['img_per_s'] / c['img_per_s']:.2f}x)" if c else ""),
        None if r is None else r["img_per_s"] >= 6000, "engine.json, engine_compiled.json, engine_profile.txt")
    r = _row(eng, "engine", "host_latency", 1)
    add("batch 1 host -> host", "p50 <= 0.6 ms, p99 <= 1.0 ms",
        None if r is None else f"p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms",
        None if r is None else r["p50_ms"] <= 0.6 and r["p99_ms"] <= 1.0, "engine.json")
    r = _row(eng, "engine", "host_throughput")
    add(f"batch {16 if r is None else r['batch']}, EfficientAD protocol", ">= 6,140 img/s",
        None if r is None else f"{r['img_per_s']:.0f} img/s", None if r is None else r["img_per_s"] >= 6140,
        "engine.json")
    r = _row(eng, "engine", "stream")
    if r is not None:
        add("InlineStream, frames one by one (serving)", "(no target)",
            f"{r['img_per_s']:.0f} img/s, p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms", None, "engine.json")

    ld = _load(work, "loader.json")
    for ds in ("jpeg1024", "mvtec_png"):
        b = _bench(ld, "test_loader_throughput", provider="cv2", dataset=ds)
        if b and "img_per_s" in b:
            add(f"loader {ds} -> 256^2 fp16 (cv2 threads; DALI not carried)", ">= 8,000 img/s JPEG with DALI",
                f"{b['img_per_s']:.0f} img/s", None, "loader.json")
    return out


def _steps(work: str) -> list[dict]:
    rows = []
    path = os.path.join(work, "steps.tsv")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, rc, secs, budget, status = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
                rows.append({"step": name, "rc": None if rc == "-" else int(rc), "seconds": int(secs),
                             "budget_s": int(budget), "status": status})
    return rows


def summary(work: str, out: str) -> None:
    info = _load(work, "machine.json") or {}
    steps, tg = _steps(work), targets(work)
    data = {"machine": info, "steps": steps, "targets": tg,
            "files": sorted(f for f in os.listdir(work) if not f.startswith("."))}
    lines = [f"gpu_check on {info.get('gpu')} ({info.get('nvidia_smi', '')}); torch {info.get('torch')} "
             f"triton {info.get('triton')} python {info.get('python')}",
             f"commit {info.get('commit')} tree {info.get('tree_hash')} started {info.get('time')}", "",
             f"{'step':20s} {'rc':>4s} {'s':>5s} {'budget':>6s}  status"]
    for s in steps:
        lines.append(f"{s['step']:20s} {'-' if s['rc'] is None else s['rc']:>4} {s['seconds']:5d} {s['budget_s']:6d}  "
                     f"{s['status']}")
    lines += ["", "target                                              met    measured (target)"]
    for t in tg:
        met = {True: "yes", False: "NO", None: "-"}[t["met"]]
        lines.append(f"{t['claim'][:51]:51s} {met:5s}  {t['measured'] or 'not measured'} ({t['target']})")
    for name, text in (("summary.json", json.dumps(data, indent=1)), ("summary.txt", "\n".join(lines) + "\n")):
        tmp = os.path.join(out, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "machine":
        print(json.dumps(machine(sys.argv[2]), indent=1))
    elif len(sys.argv) == 4 and sys.argv[1] == "summary":
        summary(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: gpu_summary.py machine WORK | summary WORK OUT")

"""Throughput of stacked targets: one compiled layer-wise reconstruction for T = 1, 8, 64 single-image gradients,
``batching="map"`` (lax.map, the CPU default) vs ``"vmap"`` (one batched solve, the accelerator default), side by
side in one process, after compilation; and the number of compilations when only the data changes.

    python benchmarks/bench_scale.py [--models cnn2_c1,cnn6] [--targets 1,8,64]

Writes benchmarks/out/scale.json and benchmarks/out/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

import jaxinv
from jaxinv import data, metrics, zoo

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: COMPILES.append(name) if "backend_compile" in name else None)


def model_of(name):
    module, variables = zoo.build(name, key=jax.random.PRNGKey(10))
    return jaxinv.from_linen(module, variables, input_shape=zoo.input_shape(name), name=name)


def targets(model, T, seed):
    x = data.sample_images(T, size=32, key=jax.random.PRNGKey(seed))
    y = jax.random.randint(jax.random.PRNGKey(seed + 1), (T,), 0, jaxinv.num_labels(model))
    g = jax.vmap(lambda xi, yi: jaxinv.client_gradient(model, xi[None], yi[None]))(x, y)
    return x, y, jax.block_until_ready(g)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn2_c1,cnn6")
    ap.add_argument("--targets", default="1,8,64")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        model = model_of(name)
        for T in map(int, args.targets.split(",")):
            for mode in ("map", "vmap"):
                x, y, g = targets(model, T, 0)
                rec = jaxinv.copa(model, g, label=y, batching=mode)  # compile
                jax.block_until_ready(rec.image)
                x, y, g = targets(model, T, 100)  # new data, same shapes
                n0 = len(COMPILES)
                t0 = time.perf_counter()
                rec = jaxinv.copa(model, g, label=y, batching=mode)
                jax.block_until_ready(rec.image)
                sec = time.perf_counter() - t0
                p = np.asarray(metrics.psnr(rec.image, x))
                rows.append({"model": name, "targets": T, "batching": mode, "seconds": sec,
                             "seconds_per_target": sec / T, "recompilations": len(COMPILES) - n0,
                             "psnr_mean": float(p.mean()), "psnr_min": float(p.min())})
                print(rows[-1], flush=True)
    res = {"machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
                      f"jax {jax.__version__}, backend {jax.default_backend()}", "rows": rows}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "scale.json"), "w") as f:
        json.dump(res, f, indent=2)
    L = ["# Stacked targets: throughput after compilation", "", res["machine"], "",
         "| model | T | map s | vmap s | vmap/map | s per target (map) | time(T)/time(1) (map) | recompiles | PSNR mean (map) |",
         "|---|---|---|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        base = next(r for r in rows if r["model"] == name and r["batching"] == "map")
        for T in map(int, args.targets.split(",")):
            m = next(r for r in rows if r["model"] == name and r["targets"] == T and r["batching"] == "map")
            v = next(r for r in rows if r["model"] == name and r["targets"] == T and r["batching"] == "vmap")
            L.append(f"| {name} | {T} | {m['seconds']:.2f} | {v['seconds']:.2f} | {v['seconds'] / m['seconds']:.2f} | "
                     f"{m['seconds_per_target']:.3f} | {m['seconds'] / base['seconds']:.1f} | "
                     f"{m['recompilations'] + v['recompilations']} | {m['psnr_mean']:.1f} |")
    with open(os.path.join(OUT, "scale.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()

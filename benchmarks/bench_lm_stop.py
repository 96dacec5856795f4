"""Levenberg-Marquardt's stall stop (``jaxinv.engine._block.LAM_STALL``): copa with the joint correction on a trained
checkpoint of ``bench_trained.py``, the stop on and off, interleaved in one process (JAX's caches cleared and a fresh
Model between modes), 4 held-out photos, cold (with compilation) and warm seconds, PSNR per photo.

Run from the repository root:  python benchmarks/bench_lm_stop.py [ARCH:STEP] (default lenet:300)
Writes benchmarks/out/trained/lm_stop.json. Needs the checkpoint cache of bench_trained.py (or trains it).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import bench_trained as bt
import jaxinv
from jaxinv import data, metrics
from jaxinv._gradient import stacked_gradients
from jaxinv.engine import _block


def main(spec: str = "lenet:300") -> list[dict]:
    arch, step = spec.split(":")
    step = int(step)
    task = data.photo_task(bt.TRAIN["n"], size=bt.TRAIN["size"], key=jax.random.key(bt.TRAIN["task_key"]))
    cache = Path.home() / ".cache" / "jaxinv_bench"
    model = bt.checkpoints(arch, (step,), task, cache, print)[step][0]
    x = jnp.stack([jnp.asarray(data.load_photo(n, size=bt.TRAIN["size"]), jnp.float32) for n in bt.HELD_OUT])
    y = jnp.arange(len(bt.HELD_OUT)) % bt.n_labels(model)
    g = stacked_gradients(model, x, y)
    rows, default = [], _block.LAM_STALL
    for mode in ("on", "off", "on", "off"):
        _block.LAM_STALL = default if mode == "on" else float("inf")
        jax.clear_caches()
        m = bt.checkpoints(arch, (step,), task, cache, lambda *a: None)[step][0]
        secs = []
        for _ in range(2):
            t0 = time.perf_counter()
            rec = jaxinv.copa(m, g, label=y)
            jax.block_until_ready(rec.image)
            secs.append(time.perf_counter() - t0)
        ps = [float(v) for v in metrics.psnr(jnp.clip(rec.image, 0, 1), x)]
        rows.append(dict(mode=mode, arch=arch, step=step, cold=secs[0], warm=secs[1], psnr=ps))
        print(json.dumps(rows[-1]), flush=True)
    _block.LAM_STALL = default
    out = Path(__file__).resolve().parent / "out" / "trained" / "lm_stop.json"
    out.write_text(json.dumps({"rows": rows, "environment": f"jax {jax.__version__}, {jax.default_backend()}"},
                              indent=1))
    return rows


if __name__ == "__main__":
    main(*sys.argv[1:])

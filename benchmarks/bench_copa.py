"""COPA benchmark: quality and time on every zoo model, and jaxinv's matrix-free solve vs the dense method.

    python benchmarks/bench_copa.py            # full: every zoo model, 8 photos, float32 and float64
    python benchmarks/bench_copa.py --quick    # smoke run: 3 models, 2 photos
    python benchmarks/bench_copa.py --parts layer,cold   # re-run some parts, keep the others

Writes benchmarks/out/copa.json and benchmarks/out/copa.md. PSNR: standard, images in [0, 1], data range 1.
(a) per zoo model: mean/min/max PSNR and SSIM over the photos, seconds for the batch (cold = with compilation,
    warm = second call), float32 and float64.
(b) side by side in one run, every layer below the head of cnn2_c1, cnn3_c3 and CNN6, its system from a real photo
    (the true z and delta): jaxinv (matrix-free LSMR) vs the dense method (materialise the stacked matrix,
    numpy.linalg.lstsq): times, their ratio, the PSNR of each solution against the layer's true input; and the
    security metric's per-layer time and rank vs a dense SVD of the same balanced matrix.
(c) a whole CNN6 reconstruction in a fresh process: seconds including compilation and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def _model(name, dtype):
    import jaxinv
    from jaxinv import zoo

    module, variables = zoo.build(name, key=jax.random.PRNGKey(10))
    variables = jax.tree_util.tree_map(lambda a: a.astype(dtype), variables)
    return jaxinv.from_linen(module, variables, input_shape=zoo.input_shape(name), name=name)


def quality(names, n, dtypes):
    import jaxinv
    from jaxinv import data, metrics, zoo

    rows = []
    photos = data.sample_images(n, size=32, key=jax.random.PRNGKey(0))
    for dname in dtypes:
        dtype = jnp.float64 if dname == "float64" else jnp.float32
        jax.config.update("jax_enable_x64", dname == "float64")
        for name in names:
            model = _model(name, dtype)
            shape = zoo.input_shape(name)
            x = photos.astype(dtype)
            if shape[-1] == 1:
                x = x.mean(-1, keepdims=True)
            x = jax.image.resize(x, (n,) + shape, "linear")
            labels = jax.random.randint(jax.random.PRNGKey(1), (n,), 0, jaxinv.num_labels(model))
            grads = jax.vmap(lambda xi, yi: jaxinv.client_gradient(model, xi[None], yi[None]))(x, labels)
            t0 = time.perf_counter()
            rec = jaxinv.copa(model, grads, label=labels)
            jax.block_until_ready(rec.image)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            rec = jaxinv.copa(model, grads, label=labels)
            jax.block_until_ready(rec.image)
            warm = time.perf_counter() - t0
            p = np.asarray(metrics.psnr(rec.image, x), np.float64)
            s = np.asarray(metrics.ssim(rec.image, x), np.float64)
            p = np.minimum(p, 300.0)  # exact reconstructions: cap inf for the mean
            row = {"model": name, "dtype": dname, "n_images": n, "psnr_mean": float(p.mean()),
                   "psnr_min": float(p.min()), "psnr_max": float(p.max()), "ssim_mean": float(s.mean()),
                   "seconds_cold": cold, "seconds_warm": warm,
                   "steps": [int(np.max(np.asarray(l.steps))) for l in rec.layers],
                   "status_ok": bool(all(np.all(np.asarray(l.status) == 0) for l in rec.layers))}
            rows.append(row)
            print(f"{dname} {name:<12} PSNR {row['psnr_mean']:6.1f} [{row['psnr_min']:.1f}, {row['psnr_max']:.1f}] "
                  f"SSIM {row['ssim_mean']:.3f}  cold {cold:5.1f}s warm {warm:5.2f}s", flush=True)
    jax.config.update("jax_enable_x64", False)
    return rows


def _true_layers(model, x, label):
    """Every layer's true input, pre-activation and delta_l = dl/dz_l for one image (the client's loss)."""
    from jaxinv.engine import layer_pass, loss_fn

    st = model.structure().stages
    leaves = jax.tree_util.tree_leaves(model.params)
    lf = loss_fn("auto", int(np.prod(st[-1].nodes.x_out.shape)))
    xs, zs, deltas = layer_pass(st, leaves, x, jnp.asarray(label).reshape(()), lf)
    return st, leaves, xs, zs, deltas


def dense_vs_matrix_free(names):
    """Every layer below the head, its system from a real photo, solved both ways side by side; and the security
    metric's per-layer time vs a dense SVD of the same (balanced) stacked matrix."""
    import scipy.linalg

    import jaxinv
    from jaxinv import data
    from jaxinv.engine import LayerSystem, Solver, solve_layer

    out = []
    jax.config.update("jax_enable_x64", False)
    dtype = jnp.float32
    x = data.sample_images(1, size=32, key=jax.random.PRNGKey(0)).astype(dtype)
    for name in names:
        model = _model(name, dtype)
        label = jnp.array(0 if jaxinv.num_labels(model) == 2 else 1)
        st, leaves, xs, zs, deltas = _true_layers(model, x, label)
        g = jaxinv.client_gradient(model, x, label[None])
        gl = jax.tree_util.tree_leaves(g)
        sec = jaxinv.security(model, key=jax.random.PRNGKey(0))
        opts = Solver()
        for layer in range(len(st) - 1):
            h, z, delta = xs[layer], zs[layer], deltas[layer]
            gW = gl[st[layer].nodes.kernel_leaf]

            @jax.jit
            def mf(z, delta, gW, layer=layer):
                sys_ = LayerSystem.build(st[layer], leaves, delta)
                return solve_layer(sys_, z, gW, opts)

            t0 = time.perf_counter()
            jax.block_until_ready(mf(z, delta, gW))
            t_cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = mf(z, delta, gW)
            jax.block_until_ready(res)
            t_mf = time.perf_counter() - t0
            x_mf = np.asarray(res[0], np.float64)

            # the dense method: materialise the stacked matrix (what the reference code builds with Python loops,
            # here with the same operators, in float64), then LAPACK least squares
            t0 = time.perf_counter()
            sys_ = LayerSystem.build(st[layer], leaves, delta)
            n = int(np.prod(h.shape))
            apply = jax.jit(jax.vmap(lambda e: jnp.concatenate([sys_.forward(e.reshape(h.shape)).ravel(),
                                                                sys_.gradient(e.reshape(h.shape)).ravel()])))
            M = np.concatenate([np.asarray(apply(jnp.eye(n, dtype=dtype)[i:i + 512]), np.float64)
                                for i in range(0, n, 512)]).T
            t_build = time.perf_counter() - t0
            A, B = M[: z.size], M[z.size:]
            nf, ng = np.linalg.norm(A, 2), np.linalg.norm(B, 2)
            Mb = np.concatenate([A / nf, B / ng])
            rhs = np.concatenate([np.asarray(z - sys_.forward_offset, np.float64).ravel() / nf,
                                  np.asarray(gW - sys_.gradient_offset, np.float64).ravel() / ng])
            t0 = time.perf_counter()
            try:
                x_dense = np.linalg.lstsq(Mb, rhs, rcond=None)[0]
            except np.linalg.LinAlgError:  # gelsd occasionally fails to converge: QR with pivoting
                x_dense = scipy.linalg.lstsq(Mb, rhs, lapack_driver="gelsy")[0]
            t_dense = t_build + time.perf_counter() - t0
            t0 = time.perf_counter()
            sv = np.linalg.svd(Mb, compute_uv=False)
            t_svd = t_build + time.perf_counter() - t0
            rank_svd = int(np.sum(sv > 1e-6 * sv[0]))
            truth = np.asarray(h, np.float64).ravel()
            rng = truth.max() - truth.min()

            def psnr(a):
                return float(10 * np.log10(rng**2 / max(np.mean((a.ravel() - truth) ** 2), 1e-300)))

            ls = sec.layers[layer]
            row = {"model": name, "layer": st[layer].layer.path, "dtype": "float32", "unknowns": n,
                   "rows": int(M.shape[0]), "dense_matrix_MB": M.nbytes / 2**20, "seconds_dense_build": t_build,
                   "seconds_jaxinv_warm": t_mf, "seconds_jaxinv_cold": t_cold, "seconds_dense": t_dense,
                   "speedup_warm": t_dense / t_mf, "speedup_cold": t_dense / t_cold,
                   "psnr_jaxinv": psnr(x_mf), "psnr_dense": psnr(x_dense), "lsmr_steps": int(res[3]),
                   "seconds_metric": float(ls.seconds), "seconds_dense_svd": t_svd, "rank_metric": int(ls.rank),
                   "rank_dense_svd": rank_svd, "metric_speedup": t_svd / max(float(ls.seconds), 1e-9),
                   "psnr_convention": "layer input, data range = its max - min"}
            out.append(row)
            print(f"{name} {row['layer']}: jaxinv {t_mf:.3f}s (cold {t_cold:.1f}s) vs dense {t_dense:.1f}s -> "
                  f"x{row['speedup_warm']:.0f} warm, x{row['speedup_cold']:.1f} cold; PSNR {row['psnr_jaxinv']:.1f} vs "
                  f"{row['psnr_dense']:.1f}; metric {ls.seconds:.2f}s rank {ls.rank} vs SVD {t_svd:.1f}s rank {rank_svd}",
                  flush=True)
    return out


COLD_SCRIPT = r"""
import time, json, sys

def _hwm():  # peak resident set of this process (VmHWM: reset by exec, unlike ru_maxrss)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024

t_import = time.perf_counter()
import jax, jax.numpy as jnp, jaxinv
from jaxinv import zoo, data, metrics
module, variables = zoo.build("{name}", key=jax.random.PRNGKey(10))
model = jaxinv.from_linen(module, variables, input_shape=(32, 32, 3))
x = data.sample_images(1, key=jax.random.PRNGKey(0))
g = jaxinv.client_gradient(model, x, jnp.array([1]))
jax.block_until_ready(g)
rss0 = _hwm()
t0 = time.perf_counter()
rec = jaxinv.copa(model, g, label={label})
jax.block_until_ready(rec.image)
t = time.perf_counter() - t0
rss1 = _hwm()
print(json.dumps(dict(model="{name}", seconds_incl_compile=t, psnr=float(metrics.psnr(rec.image, x)[0]),
                      peak_rss_MB=rss1, rss_before_MB=rss0)))
"""


def cold_whole(names):
    rows = []
    for name, label in names:
        r = subprocess.run([sys.executable, "-c", COLD_SCRIPT.format(name=name, label=label)], capture_output=True,
                           text=True, check=True)
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"cold {name}: {row['seconds_incl_compile']:.1f}s incl. compile, PSNR {row['psnr']:.1f}, "
              f"peak RSS {row['peak_rss_MB']:.0f} MB (before: {row['rss_before_MB']:.0f} MB)", flush=True)
    return rows


def markdown(res) -> str:
    lines = ["# COPA benchmark", "", "PSNR: standard, [0, 1] images, data range 1 (layer rows: the layer input).", "",
             "## (a) every zoo model, float32 vs float64 (same photos, same weights)", "",
             "| model | float32 PSNR mean [min, max] | float64 PSNR mean [min, max] | SSIM f32 / f64 | s cold f32 / f64 "
             "| s warm f32 / f64 |", "|---|---|---|---|---|---|"]
    by = {}
    for r in res["quality"]:
        by.setdefault(r["model"], {})[r["dtype"]] = r

    def cell(r, fmt):
        return "-" if r is None else fmt(r)

    for name, d in by.items():
        a, b = d.get("float32"), d.get("float64")
        ps = lambda r: f"{r['psnr_mean']:.1f} [{r['psnr_min']:.1f}, {r['psnr_max']:.1f}]"  # noqa: E731
        lines.append(f"| {name} | {cell(a, ps)} | {cell(b, ps)} | {cell(a, lambda r: format(r['ssim_mean'], '.3f'))} / "
                     f"{cell(b, lambda r: format(r['ssim_mean'], '.3f'))} | {cell(a, lambda r: format(r['seconds_cold'], '.1f'))} / "
                     f"{cell(b, lambda r: format(r['seconds_cold'], '.1f'))} | {cell(a, lambda r: format(r['seconds_warm'], '.2f'))} / "
                     f"{cell(b, lambda r: format(r['seconds_warm'], '.2f'))} |")
    lines += ["", "## (b) every layer below the head: jaxinv vs the dense method (same run, float32 photo)", "",
              "Dense = materialise the stacked matrix (float64) + LAPACK lstsq / SVD; jaxinv = matrix-free LSMR "
              "(warm, cold incl. compile) and the security metric's per-layer time (exact rank).", "",
              "| model | layer | unknowns x rows | dense MB | jaxinv s (cold) | dense s | speed-up warm (cold) | PSNR jaxinv "
              "| PSNR dense | LSMR steps | metric s | dense SVD s | rank metric / SVD |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["layer"]:
        lines.append(f"| {r['model']} | {r['layer']} | {r['unknowns']} x {r['rows']} | {r['dense_matrix_MB']:.0f} | "
                     f"{r['seconds_jaxinv_warm']:.3f} ({r['seconds_jaxinv_cold']:.1f}) | {r['seconds_dense']:.1f} | "
                     f"x{r['speedup_warm']:.0f} (x{r['speedup_cold']:.1f}) | {r['psnr_jaxinv']:.1f} | {r['psnr_dense']:.1f} "
                     f"| {r.get('lsmr_steps', '')} | {r.get('seconds_metric', float('nan')):.2f} | "
                     f"{r.get('seconds_dense_svd', float('nan')):.1f} | {r.get('rank_metric', '')} / {r.get('rank_dense_svd', '')} |")
    by_model = {}
    for r in res["layer"]:
        m = by_model.setdefault(r["model"], [0.0, 0.0, 0.0, 0.0, 0.0])
        m[0] += r["seconds_jaxinv_warm"]; m[1] += r["seconds_jaxinv_cold"]; m[2] += r["seconds_dense"]
        m[3] += r.get("seconds_metric", 0.0); m[4] += r.get("seconds_dense_svd", 0.0)
    if by_model:
        lines += ["", "Summed over the layers of each model:", "",
                  "| model | jaxinv s warm (cold) | dense lstsq s | ratio warm (cold) | metric s | dense SVD s | ratio |",
                  "|---|---|---|---|---|---|---|"]
        for k, (w, c, d, me, sv) in by_model.items():
            lines.append(f"| {k} | {w:.2f} ({c:.1f}) | {d:.1f} | x{d / w:.0f} (x{d / c:.1f}) | {me:.1f} | {sv:.1f} | "
                         f"x{sv / max(me, 1e-9):.1f} |")
    lines += ["", "## (c) whole reconstruction, fresh process, float32", "",
              "| model | seconds incl. compile | PSNR | peak RSS MB (before copa) |", "|---|---|---|---|"]
    for r in res["cold"]:
        lines.append(f"| {r['model']} | {r['seconds_incl_compile']:.1f} | {r['psnr']:.1f} | {r['peak_rss_MB']:.0f} ({r['rss_before_MB']:.0f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--models", default=None, help="comma-separated zoo models for part (a); their rows replace "
                                                   "those of an existing copa.json, the others are kept")
    ap.add_argument("--parts", default="quality,layer,cold",
                    help="comma-separated parts to run; the others are kept from an existing copa.json")
    args = ap.parse_args(argv)
    from jaxinv import zoo

    names = ["cnn2_c1", "cnn3_c1", "cnn6_head10"] if args.quick else list(zoo.names())
    n = 2 if args.quick else args.n
    parts = set(args.parts.split(","))
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "copa.json")
    res = {"quality": [], "layer": [], "cold": []}
    if os.path.exists(path):
        with open(path) as f:
            res.update(json.load(f))
    if "quality" in parts:
        rows = quality(args.models.split(",") if args.models else names, n,
                       ["float32"] if args.quick else ["float32", "float64"])
        if args.models:
            new = {(r["model"], r["dtype"]) for r in rows}
            rows = [r for r in res["quality"] if (r["model"], r["dtype"]) not in new] + rows
        res["quality"] = rows
    if "layer" in parts:
        res["layer"] = dense_vs_matrix_free(["cnn2_c1", "cnn3_c3", "cnn6"])
    if "cold" in parts:
        res["cold"] = cold_whole([("cnn6", 1), ("cnn6_head10", "None")])
    res["machine"] = {"cpus": os.cpu_count(), "backend": jax.default_backend(), "jax": jax.__version__}
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(OUT, "copa.md"), "w") as f:
        f.write(markdown(res))
    print(f"wrote {OUT}/copa.json and copa.md")


if __name__ == "__main__":
    main()

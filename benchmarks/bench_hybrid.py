"""Pull-back, hybrid and ReLU benchmark: COPA vs COPA + pull-back vs hybrid vs equal-budget DLG and IG, real photos.

    python benchmarks/bench_hybrid.py            # 8 photos, all models
    python benchmarks/bench_hybrid.py --quick    # smoke run: 2 photos, 2 models, fewer steps

Writes benchmarks/out/hybrid.json and benchmarks/out/hybrid.md. PSNR: standard, images in [0, 1] (the zoo models take
[0, 1] and subtract 0.5 inside, i.e. the papers' [-0.5, 0.5] inputs), data range 1; every reconstruction is clipped
to [0, 1] before scoring (free for every method, so plain COPA is scored at its best). float32 throughout.

(a) The underdetermined seed architectures (cnn2_c0, cnn2_c2, cnn2_c4, cnn3_c1, cnn3_c2, cnn4_c1), jaxinv.zoo weights
    (PyTorch-default init, key 10), N photos from jaxinv.data.sample_images (seed 0), random labels (seed 1), labels
    given to every method. Methods:
      copa         plain least squares per layer (jaxinv.copa)
      copa+pb      with the pull-back refinement (jaxinv.copa(..., pullback=True), default weights)
      hybrid       jaxinv.attacks._hybrid.hybrid at its defaults (least-squares start)
      hybrid+pb    the same, each layer started from the pull-back solution
      ig, dlg      the colleague's baselines (jaxinv.attacks.ig: cosine + TV, signed Adam, box; dlg: L2 distance,
                   L-BFGS, label given) with max_steps = the largest number of gradient evaluations any hybrid
                   variant used on any image of that model (Adam steps, pull-back steps and LSMR iterations
                   all counted as one evaluation each). IG runs all of them (tol=0); DLG runs L-BFGS until its
                   evaluations (line-search steps included) reach the budget (dlg max_evaluations, tol=0).
    Seconds are wall time for the batch of N images on a shared 2-core CPU, including compilation (first call).
(b) The reference comparison: whole astronaut and chelsea photos (jaxinv.data.load_photo, 32x32) on cnn3_c1 and
    cnn4_c1, one image per call, seconds including compilation, against the numbers of the authors' code
    (design/architectures.md: R-GAP / hybrid / time).
(c) ReLU networks: cnn3_c3, cnn4_c2 and R-GAP's CNN6 with every activation swapped to ReLU (and a wide 2-layer
    ReLU control); per layer whether the system with only the active forward rows is determined (oracle: the true
    x_l and delta_l, least squares, relative error of x_{l-1} < 1e-3), and the PSNR of each layer's recovered
    input along the actual chain (copa and copa+pb), plus the image PSNR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxinv
from jaxinv import data, metrics, zoo
from jaxinv import Pullback
from jaxinv.attacks import hybrid

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
SEED_MODELS = ("cnn2_c0", "cnn2_c2", "cnn2_c4", "cnn3_c1", "cnn3_c2", "cnn4_c1")
REFERENCE = {  # design/architectures.md: the authors' code on this kind of machine, standard PSNR
    ("cnn3_c1", "astronaut"): {"rgap": 11.6, "hybrid": 15.8, "seconds_hybrid": 788, "seconds_rgap": 54},
    ("cnn3_c1", "chelsea"): {"rgap": 14.5, "hybrid": 18.1, "seconds_hybrid": 818, "seconds_rgap": 66},
    ("cnn4_c1", "astronaut"): {"rgap": 11.5, "hybrid": 14.5, "seconds_hybrid": 985, "seconds_rgap": 62},
}
CNN6 = ((12, 4, 2, 2), (36, 3, 2, 1), (36, 3, 1, 1), (36, 3, 1, 1), (64, 3, 2, 1), (128, 3, 1, 1))
RELU_MODELS = {  # name: (convs (out, kernel, stride, pad), classes, head bias)
    "cnn3_c3_relu": (((6, 3, 1, 0), (9, 3, 1, 0)), 10, True),
    "cnn4_c2_relu": (((16, 5, 1, 0), (6, 5, 2, 0), (32, 5, 1, 2)), 10, True),
    "cnn6_relu": (CNN6, 1, False),
    "wide_relu": (((16, 3, 1, 0),), 10, True),  # control: 3072 unknowns, 14400 rows of which ~half active
}


def zoo_model(name):
    module, variables = zoo.build(name, key=jax.random.PRNGKey(10))
    return jaxinv.from_linen(module, variables, input_shape=zoo.input_shape(name), name=name)


def relu_model(name):
    convs, k, head_bias = RELU_MODELS[name]
    net = zoo.make_cnn(convs, ["relu"] * len(convs) + ["identity"], num_classes=k, head_bias=head_bias)
    variables = net.init(jax.random.PRNGKey(10), jnp.zeros((1, 32, 32, 3)))
    return jaxinv.from_linen(net, variables, input_shape=(32, 32, 3), name=name)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out.image)
    return out, time.perf_counter() - t0


def scores(rec, x):
    img = jnp.clip(rec.image, 0.0, 1.0)
    return np.asarray(metrics.psnr(img, x), np.float64), np.asarray(metrics.ssim(img, x), np.float64)


def evaluations(rec) -> np.ndarray:
    """Gradient evaluations per image: refinement steps plus LSMR iterations, summed over the layers."""
    total = 0
    for r in rec.layers:
        total = total + np.asarray(r.steps, np.int64)
        if r.refine_steps is not None:
            total = total + np.asarray(r.refine_steps, np.int64)
    return np.atleast_1d(total)


def stack_grads(model, x, labels):
    return jax.vmap(lambda xi, yi: jaxinv.client_gradient(model, xi[None], yi[None]))(x, labels)


# ---------------------------------------------------------------------------------------------- (a) seed models
def seed_table(names, n, quick):
    from jaxinv.attacks import dlg, ig

    x = data.sample_images(n, size=32, key=jax.random.PRNGKey(0))
    rows = []
    hy_kw = dict(max_steps=(300, 150, 50)) if quick else {}
    pb = Pullback(steps=300) if quick else Pullback()
    for name in names:
        model = zoo_model(name)
        labels = jax.random.randint(jax.random.PRNGKey(1), (n,), 0, jaxinv.num_labels(model))
        grads = stack_grads(model, x, labels)
        res = {}
        runs = {
            "copa": lambda: jaxinv.copa(model, grads, label=labels),
            "copa+pb": lambda: jaxinv.copa(model, grads, label=labels, pullback=pb),
            "hybrid": lambda: hybrid(model, grads, label=labels, **hy_kw),
            "hybrid+pb": lambda: hybrid(model, grads, label=labels, pullback=pb, **hy_kw),
        }
        for meth, fn in runs.items():
            rec, sec = timed(fn)
            p, s = scores(rec, x)
            raw = np.asarray(metrics.psnr(rec.image, x), np.float64)
            res[meth] = {"psnr": p.tolist(), "psnr_mean": float(p.mean()), "psnr_unclipped_mean": float(raw.mean()),
                         "ssim_mean": float(s.mean()), "seconds": sec, "evaluations": evaluations(rec).tolist()}
            print(f"{name:<8} {meth:<10} PSNR {p.mean():6.2f} (unclipped {raw.mean():6.2f}) SSIM {s.mean():.3f} "
                  f"{sec:6.1f}s  evals max {max(res[meth]['evaluations'])}", flush=True)
        budget = int(max(max(res["hybrid"]["evaluations"]), max(res["hybrid+pb"]["evaluations"])))
        key = jax.random.PRNGKey(2)
        base = {
            "ig": lambda: ig(model, grads, label=labels, key=key, max_steps=budget, tol=0.0),
            "dlg": lambda: dlg(model, grads, label=labels, key=key, max_steps=budget, max_evaluations=budget, tol=0.0),
        }
        for meth, fn in base.items():
            rec, sec = timed(fn)
            p, s = scores(rec, x)
            tr = np.asarray(rec.loss_trace)
            iters = [int((np.flatnonzero(np.isfinite(t))[-1] + 1) * 10) if np.isfinite(t).any() else 0 for t in tr]
            res[meth] = {"psnr": p.tolist(), "psnr_mean": float(p.mean()), "ssim_mean": float(s.mean()),
                         "seconds": sec, "max_steps": budget, "iterations_run_approx": iters}
            print(f"{name:<8} {meth:<10} PSNR {p.mean():6.2f} SSIM {s.mean():.3f} {sec:6.1f}s  budget {budget}",
                  flush=True)
        rows.append({"model": name, "n_images": n, "budget": budget, "methods": res})
    return rows


# ------------------------------------------------------------------------------------------- (b) the reference
def reference_table(quick):
    rows = []
    cases = [("cnn3_c1", "astronaut")] if quick else list(REFERENCE)
    hy_kw = dict(max_steps=(300, 150, 50)) if quick else {}
    pb = Pullback(steps=300) if quick else Pullback()
    for name, photo in cases:
        model = zoo_model(name)
        x = data.load_photo(photo, size=32)[None]
        label = jnp.array([1])
        g = jaxinv.client_gradient(model, x, label)
        row = {"model": name, "photo": photo, "reference": REFERENCE[(name, photo)]}
        for meth, fn in {
            "copa": lambda: jaxinv.copa(model, g, label=1),
            "copa+pb": lambda: jaxinv.copa(model, g, label=1, pullback=pb),
            "hybrid": lambda: hybrid(model, g, label=1, **hy_kw),
            "hybrid+pb": lambda: hybrid(model, g, label=1, pullback=pb, **hy_kw),
        }.items():
            rec, sec = timed(fn)
            p, _ = scores(rec, x)
            row[meth] = {"psnr": float(p[0]), "seconds": sec}
            print(f"ref {name} {photo:<9} {meth:<10} PSNR {p[0]:6.2f} {sec:6.1f}s", flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- (c) ReLU nets
def _truth(model, x, label, loss):
    """True inputs x_{l-1}, pre-activations z_l and delta_l of every layer (one image)."""
    from jaxinv.engine import layer_pass, loss_fn

    stages = model.structure().stages
    lf = loss_fn(loss, math.prod(stages[-1].nodes.x_out.shape))
    return layer_pass(stages, jax.tree_util.tree_leaves(model.params), x, jnp.asarray(label).reshape(()), lf)


def _rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.maximum(jnp.linalg.norm(b.ravel()), 1e-30))


def _layer_psnr(a, b):
    b = np.asarray(b, np.float64)
    rng = max(b.max() - b.min(), 1e-12)
    mse = max(float(np.mean((np.asarray(a, np.float64) - b) ** 2)), 1e-30)
    return 10 * math.log10(rng**2 / mse)


def oracle_layers(model, x, label, loss, gleaves):
    """Per layer below the head: is the system with only the active rows determined (exact data, LSQ)?"""
    from jaxinv.engine import LayerSystem, Solver, solve_layer

    stages = model.structure().stages
    leaves = jax.tree_util.tree_leaves(model.params)
    xs, zs, deltas = _truth(model, x, label, loss)
    out = []
    for l in range(len(stages) - 1):
        st = stages[l]
        mask = (xs[l + 1] > 0).astype(x.dtype) if st.activation.name == "relu" else None

        @jax.jit
        def solve(z, delta, gW, mask=mask, st=st):
            sys = LayerSystem.build(st, leaves, delta)
            return solve_layer(sys, z, gW, Solver(max_steps=6000), mask=mask)

        sol = solve(zs[l] * (1.0 if mask is None else mask), deltas[l], gleaves[st.nodes.kernel_leaf])
        err = _rel(sol[0], xs[l])
        active = int(mask.sum()) if mask is not None else st.layer.forward_rows
        out.append({"layer": st.layer.path, "unknowns": st.layer.unknowns, "active_rows": active,
                    "gradient_rows": st.layer.gradient_rows, "oracle_rel_error": err,
                    "determined": bool(err < 1e-3), "oracle_psnr": _layer_psnr(sol[0], xs[l])})
    return out


def chain(model, grads, labels, pullback):
    """COPA's fold over a stack of targets, keeping every layer's recovered input."""
    st = model.structure()
    rec = jaxinv.copa(model, grads, label=labels, refine=False if pullback is None else pullback)
    return {l: x.reshape((x.shape[0],) + tuple(s.nodes.x_in.shape)) for l, (x, s) in enumerate(zip(rec.layer_inputs,
                                                                                               st.stages))}


def relu_table(names, n, quick):
    x = data.sample_images(n, size=32, key=jax.random.PRNGKey(0))
    rows = []
    pb = Pullback(steps=300) if quick else Pullback()
    for name in names:
        model = relu_model(name)
        loss = "logistic" if model.num_outputs == 1 else "cross_entropy"
        labels = jax.random.randint(jax.random.PRNGKey(1), (n,), 0, jaxinv.num_labels(model))
        grads = stack_grads(model, x, labels)
        t0 = time.perf_counter()
        oracle = oracle_layers(model, x[:1], labels[:1], loss, [a[0] for a in jax.tree_util.tree_leaves(grads)])
        t_oracle = time.perf_counter() - t0
        row = {"model": name, "layers": oracle, "oracle_seconds": t_oracle, "n_images": n}
        print(f"{name}: " + ", ".join(f"{o['layer']} {'det' if o['determined'] else 'DEF'} "
                                      f"({o['active_rows']}+{o['gradient_rows']} rows / {o['unknowns']})"
                                      for o in oracle), flush=True)
        truths = [jax.vmap(lambda xi, yi: [a[0] for a in _truth(model, xi[None], yi, loss)[0]])(x, labels)]
        truth_layers = truths[0]
        for meth, pbk in (("copa", None), ("copa+pb", pb)):
            t0 = time.perf_counter()
            outs = chain(model, grads, labels, pbk)
            jax.block_until_ready(outs[0])
            sec = time.perf_counter() - t0
            img = jnp.clip(outs[0].reshape(x.shape), 0, 1)
            p = np.asarray(metrics.psnr(img, x), np.float64)
            per_layer = [float(np.mean([_layer_psnr(outs[l][i], truth_layers[l][i]) for i in range(n)]))
                         for l in range(len(oracle))]
            row[meth] = {"psnr": p.tolist(), "psnr_mean": float(p.mean()), "layer_psnr": per_layer, "seconds": sec}
            print(f"  {meth:<8} image PSNR {p.mean():6.2f} [{p.min():.1f}, {p.max():.1f}]  layer inputs "
                  + " ".join(f"{v:.1f}" for v in per_layer) + f"  {sec:.1f}s", flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------ report
def markdown(res) -> str:
    L = ["# Pull-back, hybrid and ReLU benchmark", "",
         f"float32; PSNR standard, images clipped to [0, 1], data range 1; {res['machine']}. Wall time per part: "
         + ", ".join(f"{k} {v:.0f} s" for k, v in res.get("seconds", {}).items() if v is not None)
         + " (2-core machine, shared with other work: ratios within a row are side by side, absolute times noisy).",
         ""]
    if res["seed"]:
        n = res["seed"][0]["n_images"]
        L += [f"## (a) underdetermined seed architectures: mean PSNR over {n} photos (SSIM), seconds for the batch",
              "", "Baselines `ig` (cosine + TV) and `dlg` (L2, label given) run with max_steps = budget = the most "
              "gradient evaluations any hybrid variant used on any image (Adam + pull-back steps + LSMR iterations); "
              "IG runs them all, DLG runs L-BFGS until its evaluations (line-search steps included) reach it.",
              "", "| model | copa | copa+pb | hybrid | hybrid+pb | ig (equal budget) | dlg (equal budget) | budget |",
              "|---|---|---|---|---|---|---|---|"]
        for r in res["seed"]:
            m = r["methods"]
            cells = [f"{m[k]['psnr_mean']:.2f} ({m[k]['ssim_mean']:.2f}) {m[k]['seconds']:.0f}s"
                     for k in ("copa", "copa+pb", "hybrid", "hybrid+pb", "ig", "dlg")]
            L.append(f"| {r['model']} | " + " | ".join(cells) + f" | {r['budget']} |")
        mean = lambda k: np.mean([r["methods"][k]["psnr_mean"] for r in res["seed"]])  # noqa: E731
        L.append("| **mean** | " + " | ".join(f"**{mean(k):.2f}**" for k in ("copa", "copa+pb", "hybrid",
                                                                                   "hybrid+pb", "ig", "dlg")) + " | |")
        L += ["", "Gains over plain COPA (dB, mean over the photos) and time ratios:", "",
              "| model | pb - copa | hybrid - copa | hybrid+pb - copa | hybrid - ig | hybrid - dlg | "
              "t(copa+pb)/t(copa) | t(hybrid)/t(copa) | t(ig)/t(hybrid) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["seed"]:
            m = r["methods"]
            d = lambda a, b: m[a]["psnr_mean"] - m[b]["psnr_mean"]  # noqa: E731
            t = lambda a, b: m[a]["seconds"] / m[b]["seconds"]  # noqa: E731
            L.append(f"| {r['model']} | {d('copa+pb', 'copa'):+.2f} | {d('hybrid', 'copa'):+.2f} | "
                     f"{d('hybrid+pb', 'copa'):+.2f} | {d('hybrid', 'ig'):+.2f} | {d('hybrid', 'dlg'):+.2f} | "
                     f"{t('copa+pb', 'copa'):.1f} | {t('hybrid', 'copa'):.1f} | {t('ig', 'hybrid'):.1f} |")
    if res["reference"]:
        L += ["", "## (b) against the authors' code (design/architectures.md), one whole photo per call, seconds "
              "incl. compilation", "", "| model, photo | their R-GAP | their hybrid (s) | copa (s) | copa+pb (s) | "
              "hybrid (s) | hybrid+pb (s) | time ratio their hybrid / our hybrid+pb |", "|---|---|---|---|---|---|---|---|"]
        for r in res["reference"]:
            ref = r["reference"]
            c = lambda k: f"{r[k]['psnr']:.1f} ({r[k]['seconds']:.0f})"  # noqa: E731
            L.append(f"| {r['model']}, {r['photo']} | {ref['rgap']} | {ref['hybrid']} ({ref['seconds_hybrid']}) | "
                     f"{c('copa')} | {c('copa+pb')} | {c('hybrid')} | {c('hybrid+pb')} | "
                     f"x{ref['seconds_hybrid'] / r['hybrid+pb']['seconds']:.0f} |")
        L += ["", "Weights differ from the authors' (same PyTorch-default distribution, JAX random stream), so the "
              "comparison is of methods on the same photos, not of identical networks."]
    if res["relu"]:
        L += ["", "## (c) ReLU networks", "",
              "Per layer (input layer first): rows with only the active units + gradient rows / unknowns; "
              "**det** = the system with only the active rows is determined (oracle: true x_l and delta_l, "
              "least squares, relative error < 1e-3), DEF = not; then the PSNR of each layer's recovered input along "
              "the actual chain (data range = max - min of the true layer input), and the image PSNR.", "",
              "| model | layers | copa: layer-input PSNR | copa image | copa+pb: layer-input PSNR | copa+pb image | s copa / copa+pb |",
              "|---|---|---|---|---|---|---|"]
        for r in res["relu"]:
            lay = "; ".join(f"{o['layer'].split('/')[0]} {o['active_rows']}+{o['gradient_rows']}/{o['unknowns']} "
                            f"{'**det**' if o['determined'] else 'DEF'}" for o in r["layers"])
            f = lambda k: " / ".join(f"{v:.1f}" for v in r[k]["layer_psnr"])  # noqa: E731
            L.append(f"| {r['model']} | {lay} | {f('copa')} | {r['copa']['psnr_mean']:.2f} | {f('copa+pb')} | "
                     f"{r['copa+pb']['psnr_mean']:.2f} | {r['copa']['seconds']:.0f} / {r['copa+pb']['seconds']:.0f} |")
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--parts", default="seed,reference,relu",
                    help="comma-separated parts to run; the other parts are kept from an existing output file")
    args = ap.parse_args(argv)
    n = 2 if args.quick else args.n
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    res = {"machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, jax {jax.__version__}",
           "quick": args.quick}
    res["seed"] = seed_table(("cnn2_c2", "cnn3_c1") if args.quick else SEED_MODELS, n, args.quick) \
        if "seed" in parts else []
    res["reference"] = reference_table(args.quick) if "reference" in parts else []
    res["relu"] = relu_table(("wide_relu", "cnn3_c3_relu") if args.quick else tuple(RELU_MODELS), n, args.quick) \
        if "relu" in parts else []
    res["seconds"] = {p: time.perf_counter() - t0 for p in parts}
    os.makedirs(OUT, exist_ok=True)
    stem = "hybrid_quick" if args.quick else "hybrid"
    path = os.path.join(OUT, f"{stem}.json")
    if os.path.exists(path):  # a partial run keeps the other parts of the last one
        with open(path) as f:
            old = json.load(f)
        for part in ("seed", "reference", "relu"):
            if part not in parts and old.get(part):
                res[part] = old[part]
                res["seconds"][part] = old.get("seconds", {}).get(part, old.get("seconds_total"))
    with open(os.path.join(OUT, f"{stem}.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(OUT, f"{stem}.md"), "w") as f:
        f.write(markdown(res))
    print(f"wrote {OUT}/{stem}.json and {stem}.md")


if __name__ == "__main__":
    main()

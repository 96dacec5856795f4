"""Defences: measured attack PSNR vs the security metric's prediction, and the smallest level that protects.

    python benchmarks/bench_defences.py           # 4 photos, float32
    python benchmarks/bench_defences.py --quick   # 2 photos, fewer levels

(a) Validation of ``jaxinv.security(model, defence=...)``: 6 zoo architectures x 4 relative Gaussian noise levels;
    COPA measured on bundled real photos (labels known to both), the metric from synthetic probes only;
    Spearman rank correlation over all 24 (architecture, level) points.
(b) The table: 3 zoo models x (Gaussian noise, pruning, quantisation) levels; measured mean PSNR of the best of
    COPA and Inverting Gradients (cosine + TV, ``--ig-steps``), the metric's prediction, and the smallest level of
    each defence that brings the best attack below 15 dB. Runs go through ``jaxinv.sweep`` (JSONL in benchmarks/out).
(c) Batch size B (1, 2, 4, 8) and FedAvg local steps K (1, 2, 5, 10; lr 0.01) on cnn2_c1, cnn6_head10 (10 classes)
    and lenet (10 classes; the 2-class models cannot separate batches of more than 2).
Writes benchmarks/out/defences.json and defences.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
import scipy.stats

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
SAFE_DB = 15.0


def _model(name):
    import jaxinv
    from jaxinv import zoo

    module, variables = zoo.build(name, key=jax.random.key(10))
    return jaxinv.from_linen(module, variables, input_shape=zoo.input_shape(name), name=name)


def _mean_psnr(rows, model, defence, attack):
    p = [min(r["psnr"], 300.0) if r["psnr"] is not None else (300.0 if r.get("exact") else np.nan)
         for r in rows if r["kind"] == "attack" and r["model"] == model and r["defence"] == defence
         and r["attack"] == attack and r["error"] is None]
    return float(np.mean(p)) if p else float("nan")


def run(models, defences, attacks, n, ig_steps, tag):
    import jaxinv

    mods = {m: _model(m) for m in models}
    t0 = time.perf_counter()
    rows = jaxinv.sweep(mods, n, out=os.path.join(OUT, f"defences_{tag}.jsonl"), key=jax.random.key(0),
                        attacks=attacks, defences=defences, security=False,
                        attack_options={"ig": {"max_steps": ig_steps}} if "ig" in attacks else None)
    t_sweep = time.perf_counter() - t0
    out = []
    for m, model in mods.items():
        for dname, d in defences.items():
            t0 = time.perf_counter()
            rep = jaxinv.security(model, key=jax.random.key(1), defence=d)
            meas = {a: _mean_psnr(rows, m, dname, a) for a in attacks}
            best = max(meas, key=lambda a: -np.inf if np.isnan(meas[a]) else meas[a])
            out.append({"model": m, "defence": dname, "params": d.params, "predicted": rep.score,
                        "predicted_undefended": rep.score_undefended, "measured": meas, "best_attack": best,
                        "best_psnr": meas[best], "noise_gain": [l.noise_gain for l in rep.layers],
                        "metric_seconds": time.perf_counter() - t0})
            print(f"{tag} {m:<10} {dname:<34} predicted {rep.score:6.1f}  measured "
                  + " ".join(f"{a} {v:6.1f}" for a, v in meas.items()), flush=True)
    return out, t_sweep


def batch_and_fedavg(models, n, ig_steps, batches=(1, 2, 4, 8), ks=(1, 2, 5, 10), lr=0.01):
    """(c) batch size B and FedAvg local steps K: best of COPA and IG (matched to the truth) vs the prediction."""
    import jax.numpy as jnp

    import jaxinv
    from jaxinv import data, metrics

    out = []

    def score(img, x):
        perm, _ = metrics.match(jnp.clip(img, 0, 1), x, metric="mse")
        mse = float(jnp.mean((jnp.clip(img, 0, 1)[jnp.asarray(perm)] - x) ** 2))
        return float(-10 * np.log10(max(mse, 1e-30)))

    for m in models:
        model = _model(m)
        shape = model.resolve_input_shape(None)
        K = jaxinv.num_labels(model)
        for B in batches:
            x = data.fit_images(data.sample_images(B, key=jax.random.key(11)), shape)
            y = jax.random.permutation(jax.random.key(12), max(K, B))[:B] % K
            g = jaxinv.client_gradient(model, x, y)
            meas = {}
            try:
                meas["copa"] = score(jaxinv.copa(model, g, label=y).image, x)
            except ValueError as e:
                meas["copa"] = float("nan")
                print(f"  copa B={B} on {m}: {str(e).splitlines()[0][:120]}")
            meas["ig"] = score(jaxinv.attack("ig", model, g, label=y, key=jax.random.key(0), max_steps=ig_steps).image, x)
            try:
                pred = jaxinv.security(model, key=jax.random.key(1), batch_size=B).score
            except ValueError:
                pred = float("nan")
            best = max(meas, key=lambda a: -np.inf if np.isnan(meas[a]) else meas[a])
            out.append({"model": m, "setting": f"batch B={B}", "measured": meas, "best_attack": best,
                        "best_psnr": meas[best], "predicted": pred})
            print(f"c {m:<10} batch B={B:<3} predicted {pred:6.1f} measured "
                  + " ".join(f"{a} {v:6.1f}" for a, v in meas.items()), flush=True)
        x = data.fit_images(data.sample_images(1, key=jax.random.key(11)), shape)
        y = jnp.array([1 % K])
        for k in ks:
            upd = jaxinv.local_update(model, x, y, steps=k, lr=lr)
            g = jaxinv.update_as_gradient(upd, steps=k, lr=lr)
            fed = {"local_steps": k, "local_lr": lr} if k > 1 else {}
            meas = {"copa": score(jaxinv.copa(model, g, label=y, **fed).image, x),
                    "ig": score(jaxinv.attack("ig", model, g, label=y, key=jax.random.key(0), max_steps=ig_steps,
                                              **({"local_steps": k, "local_lr": lr} if k > 1 else {})).image, x)}
            pred = jaxinv.security(model, key=jax.random.key(1), local_steps=k, local_lr=lr).score
            best = max(meas, key=lambda a: meas[a])
            out.append({"model": m, "setting": f"FedAvg K={k}, lr={lr:g}", "measured": meas, "best_attack": best,
                        "best_psnr": meas[best], "predicted": pred})
            print(f"c {m:<10} FedAvg K={k:<3} predicted {pred:6.1f} measured "
                  + " ".join(f"{a} {v:6.1f}" for a, v in meas.items()), flush=True)
    return out


def _batch_md(rows, ig_steps):
    lines = ["", "## (c) batch size and FedAvg local steps", "",
             f"Batch: B bundled photos in one gradient, COPA's batch path (head separation + joint layers) and IG "
             f"({ig_steps} steps, batch_size=B), reconstructions matched to the truth (MSE assignment). FedAvg: one "
             "photo, K local SGD steps (float32 weights: the update carries their rounding), COPA on update_as_gradient corrected by "
             "simulating the K steps (copa(local_steps=K)), IG simulating the K steps. Prediction: "
             "jaxinv.security(batch_size=B) / (local_steps=K, local_lr=lr).", "",
             "| model | setting | COPA | IG | best | predicted |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['setting']} | {r['measured']['copa']:.1f} | {r['measured']['ig']:.1f} | "
                     f"{r['best_psnr']:.1f} ({r['best_attack']}) | {r['predicted']:.1f} |")
    return lines


def main(argv=None):
    from jaxinv import defences as D

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--ig-steps", type=int, default=300)
    ap.add_argument("--parts", default="noise,batch", help="noise: parts (a) and (b); batch: part (c); parts not "
                                                         "run are kept from an existing defences.json")
    args = ap.parse_args(argv)
    n = 2 if args.quick else args.n
    os.makedirs(OUT, exist_ok=True)
    parts = set(args.parts.split(","))
    path = os.path.join(OUT, "defences.json")
    if "noise" not in parts:
        with open(path) as f:
            res = json.load(f)
        res["batch_fedavg"] = batch_and_fedavg(("cnn2_c1",) if args.quick else ("cnn2_c1", "cnn6_head10", "lenet"),
                                               n, args.ig_steps)
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=float)
        md = open(os.path.join(OUT, "defences.md")).read().split("\n## (c)")[0].rstrip("\n").split("\n")
        with open(os.path.join(OUT, "defences.md"), "w") as f:
            f.write("\n".join(md + _batch_md(res["batch_fedavg"], args.ig_steps)) + "\n")
        print(f"wrote {OUT}/defences.json and defences.md")
        return
    levels = (1e-3, 1e-2, 1e-1, 1.0)
    val_models = ("cnn2_c1", "cnn3_c3", "cnn6", "fcn3", "lenet_dlg", "cnn2_c5")
    noise = {f"gaussian {s:g}": D.gaussian(s, relative=True) for s in levels}
    val, t_val = run(val_models[:3] if args.quick else val_models, noise, ("copa",), n, args.ig_steps, "validation")
    pred = [r["predicted"] for r in val]
    meas = [r["measured"]["copa"] for r in val]
    rho = float(scipy.stats.spearmanr(pred, meas).statistic)
    mae = float(np.mean(np.abs(np.minimum(pred, 150) - np.minimum(meas, 150))))
    print(f"validation: Spearman {rho:.3f}, mean |pred - meas| {mae:.1f} dB over {len(val)} points", flush=True)

    table_defs = dict(noise)
    table_defs.update({f"prune {r:g}": D.prune(r) for r in (0.5, 0.9, 0.99)})
    table_defs.update({f"quantize {b} bit": D.quantize(b) for b in (8, 4, 2)})
    table_models = ("cnn2_c1", "cnn6", "lenet_dlg")
    table, t_tab = run(table_models[:1] if args.quick else table_models, table_defs, ("copa", "ig"), n,
                       args.ig_steps, "table")
    smallest = {}
    for m in {r["model"] for r in table}:
        for fam in ("gaussian", "prune", "quantize"):
            rows = [r for r in table if r["model"] == m and r["defence"].startswith(fam)]
            ok = [r["defence"] for r in rows if r["best_psnr"] < SAFE_DB]
            smallest[f"{m} {fam}"] = ok[0] if ok else None
    res = {"validation": val, "spearman": rho, "mae_db": mae, "table": table, "smallest_below_15dB": smallest,
           "seconds": {"validation_sweep": t_val, "table_sweep": t_tab}, "n_images": n, "ig_steps": args.ig_steps,
           "machine": {"cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend()}}
    with open(os.path.join(OUT, "defences.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    lines = ["# Defences: measured vs predicted", "",
             f"{n} bundled photos per model, float32, labels known; noise is relative (sigma x the gradient's RMS "
             f"entry); IG: {args.ig_steps} steps, cosine + TV. Prediction: jaxinv.security(model, defence=d) from "
             "synthetic probes only.", "",
             f"## (a) validation: {len(val)} points, Spearman {rho:.3f}, mean |error| {mae:.1f} dB (capped at 150)", "",
             "| model | defence | predicted dB | COPA measured dB |", "|---|---|---|---|"]
    for r in val:
        lines.append(f"| {r['model']} | {r['defence']} | {r['predicted']:.1f} | {r['measured']['copa']:.1f} |")
    lines += ["", "## (b) best attack vs prediction", "",
              "| model | defence | COPA | IG | best | predicted (layer-wise) |", "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['model']} | {r['defence']} | {r['measured']['copa']:.1f} | {r['measured']['ig']:.1f} | "
                     f"{r['best_psnr']:.1f} ({r['best_attack']}) | {r['predicted']:.1f} |")
    lines += ["", f"Smallest level with the best attack below {SAFE_DB:g} dB:", ""]
    for k, v in sorted(smallest.items()):
        lines.append(f"* {k}: {v or 'none of the levels tried'}")
    with open(os.path.join(OUT, "defences.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {OUT}/defences.json and defences.md")
    if "batch" in parts:
        main(["--parts", "batch", "--n", str(args.n), "--ig-steps", str(args.ig_steps)] + (["--quick"] if args.quick
                                                                                            else []))


if __name__ == "__main__":
    main()

"""Trained checkpoints: does the security score still predict the layer-wise attacks once the model has learnt?

    python benchmarks/bench_trained.py                      # default: 8 architectures x 4 checkpoints x 4 photos
    python benchmarks/bench_trained.py --quick              # smoke run: 3 architectures, steps 0 and 300, 2 photos
    python benchmarks/bench_trained.py --tag before --out benchmarks/out   # writes trained_before.{json,md}

Writes ``<out>/trained[_<tag>].json`` and ``.md`` (default ``<out>`` = ``benchmarks/out``). The JSON is rewritten
after every (architecture, checkpoint) point, so a killed run keeps what it had; ``--resume`` skips the points
already in it (same configuration). ``--merge A.json B.json --tag T`` runs nothing and writes the points of both
(B's replacing A's of the same architecture and step), e.g. a few points re-measured after a change.

**Models.** ``jaxinv.zoo`` architectures built with ``zoo.build(name, key=jax.random.key(0))`` (PyTorch-default
init), float32, plus ``cnn3_c3_relu`` (``zoo.make_cnn``: cnn3_c3's convolutions ``(6, 3, 1, 0), (9, 3, 1, 0)``
with ReLU after each, identity logits, 10 classes, dense head with bias, no conv biases; no model of
``zoo.names()`` uses plain ReLU), initialised with ``jax.random.key(0)`` on a zero batch.

**Training.** ``jaxinv.zoo.train`` (Adam, lr 1e-3, batch 32, batches from ``jax.random.key(2)``) on
``jaxinv.data.photo_task(512, size=32, key=jax.random.key(0))`` (crops of astronaut, chelsea, coffee, rocket,
labels 0..3; a one-output model would get ``labels % 2``); checkpoints at steps 0 (the initialisation), 100, 300,
1000. Held-out accuracy on ``photo_task(256, key=jax.random.key(1))``. Checkpoints are cached as
``<cache>/ckpt_{arch}_{step}.npz`` (flattened float32 parameters plus the training configuration, checked on
load; default cache ``~/.cache/jaxinv_bench``; ``--no-cache`` retrains).

**Targets.** The 4 photos never trained on, whole: ``jaxinv.data.load_photo(name, size=32)`` for hubble_deep_field,
immunohistochemistry, retina, motorcycle (float32, ``[0, 1]``). Photo ``i`` gets label ``i % n_labels``
(``n_labels`` = the model's outputs, 2 for a one-output model): labels 0, 1, 2, 3, i.e. each held-out photo is
presented as one of the trained classes. The attacked object is the float32 client gradient of the one image
(``jaxinv.client_gradient`` on the float32 checkpoint). Labels are given to every attack.

**Attacks** (PSNR in dB, standard, data range 1, reconstructions clipped to ``[0, 1]`` before scoring; capped at
150 dB):

* ``copa``: ``jaxinv.copa(model, grads, label=labels)`` on the photos' gradients stacked on a leading axis (one
  call for all photos: ``seconds`` is that call's, ``seconds_per_photo`` = seconds / photos);
* ``copa_pb``: the same with ``refine=True`` (COPA + pull-back, default ``Pullback()``);
* ``hybrid``: ``jaxinv.attack('hybrid', model, g, label=y)`` per photo, default ``HybridOptions`` (unless
  ``--hybrid-steps``); ``evaluations`` = LSMR iterations + Adam steps summed over the layers;
* ``ig``: ``jaxinv.attack('ig', model, g, label=y, key=jax.random.key(3), max_steps=S, tol=0)`` per photo: a fixed
  budget of ``S = --ig-steps`` signed-Adam steps (default 1000, 200 with ``--quick``), one restart, otherwise
  ``IGOptions`` defaults (lr 0.025, no TV); ``evaluations`` = steps run (from the loss trace) x restarts.

Per-photo seconds of the per-photo attacks include compilation on the first photo of each point. ``grey`` is the
PSNR of a constant image at the photo's true per-channel mean (what a reconstruction that only knows the mean
colour scores). ``best`` = max(copa, copa_pb, hybrid), the best layer-wise PSNR. Every attack call is wrapped: a
failure records its error string (and the point goes on).

**Security.** ``jaxinv.security(ckpt.model, key=jax.random.key(0))``: score (predicted PSNR of the layer-wise
attack), verdict, COPA index, blamed layer and per-layer rank / deficiency / sigma_min / lost energy / inverse
gain. The markdown compares it with the measured mean best layer-wise PSNR per point, over the trained checkpoints
(steps > 0) and separately at step 0: Spearman rank correlation, mean |score - PSNR|, agreement of the verdict
category (LEAKS >= 30 dB, PARTIAL >= 15 dB, RESISTANT below), and over images the fraction best >= grey and
best >= IG.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jaxinv
from jaxinv import data, metrics, zoo

OUT = Path(__file__).resolve().parent / "out"
ARCHS = ("cnn2_c1", "cnn3_c3", "cnn6_head10", "lenet", "lenet_dlg", "cnn3_c1", "cnn4_c1", "cnn3_c3_relu")
QUICK_ARCHS = ("cnn2_c1", "cnn6_head10", "lenet")
STEPS = (0, 100, 300, 1000)
QUICK_STEPS = (0, 300)
HELD_OUT = ("hubble_deep_field", "immunohistochemistry", "retina", "motorcycle")
ATTACKS = ("copa", "copa_pb", "hybrid", "ig")
LAYERWISE = ("copa", "copa_pb", "hybrid")
# ReLU models built with zoo.make_cnn: name -> (convs (out, kernel, stride, pad), classes, head bias)
RELU_MODELS = {"cnn3_c3_relu": (((6, 3, 1, 0), (9, 3, 1, 0)), 10, True)}
TRAIN = dict(n=512, size=32, task_key=0, heldout_n=256, heldout_key=1, train_key=2, lr=1e-3, batch_size=32,
             init_key=0)
PSNR_CAP = 150.0
LEAK_DB, SAFE_DB = 30.0, 15.0


# ------------------------------------------------------------------------------------------------------- models
def build(name: str) -> jaxinv.Model:
    shape = (TRAIN["size"], TRAIN["size"], 3)
    if name in RELU_MODELS:
        convs, k, head_bias = RELU_MODELS[name]
        net = zoo.make_cnn(convs, ["relu"] * len(convs) + ["identity"], num_classes=k, head_bias=head_bias)
        variables = net.init(jax.random.key(TRAIN["init_key"]), jnp.zeros((1, *shape)))
        return jaxinv.from_linen(net, variables, input_shape=shape, name=name)
    module, variables = zoo.build(name, key=jax.random.key(TRAIN["init_key"]))
    return jaxinv.from_linen(module, variables, input_shape=zoo.input_shape(name), name=name)


def n_labels(model: jaxinv.Model) -> int:
    return 2 if model.num_outputs == 1 else model.num_outputs


def task_labels(model, labels):
    return labels % 2 if model.num_outputs == 1 else labels


def config_id(name: str) -> str:
    """A short hash of everything a cached checkpoint depends on (besides the jaxinv code)."""
    return hashlib.sha1(json.dumps([name, TRAIN, RELU_MODELS.get(name)], sort_keys=True).encode()).hexdigest()[:12]


def with_params(model, leaves):
    treedef = jax.tree_util.tree_structure(model.params)
    old = jax.tree_util.tree_leaves(model.params)
    new = [jnp.asarray(a, o.dtype).reshape(o.shape) for a, o in zip(leaves, old)]
    return eqx.tree_at(lambda m: m.params, model, jax.tree_util.tree_unflatten(treedef, new))


def checkpoints(name: str, steps, train_task, cache: Path | None, log):
    """``{step: (model, train_loss, train_accuracy, seconds_to_train_or_load, cached)}``, from the cache or trained."""
    base = build(name)
    out, missing = {}, []
    for s in steps:
        path = None if cache is None else cache / f"ckpt_{name}_{s}.npz"
        if path is not None and path.exists():
            try:
                t0 = time.perf_counter()
                z = np.load(path, allow_pickle=False)
                if str(z["config"]) == config_id(name):
                    n = int(z["n_leaves"])
                    model = with_params(base, [z[f"p{i}"] for i in range(n)])
                    out[s] = (model, float(z["loss"]), float(z["accuracy"]), time.perf_counter() - t0, True)
                    continue
                log(f"  cache {path.name}: other configuration, retraining")
            except Exception as err:  # a corrupt file: retrain
                log(f"  cache {path.name}: unreadable ({err!r}), retraining")
        missing.append(s)
    if missing:
        labels = task_labels(base, train_task.labels)
        t0 = time.perf_counter()
        ckpts = zoo.train(base, (train_task.images, labels), steps=tuple(sorted(missing)), lr=TRAIN["lr"],
                          batch_size=TRAIN["batch_size"], key=jax.random.key(TRAIN["train_key"]))
        sec = time.perf_counter() - t0
        log(f"  trained {name} to steps {missing} in {sec:.0f} s")
        for c in ckpts:
            out[c.step] = (c.model, c.loss, c.accuracy, sec, False)
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
                leaves = [np.asarray(a) for a in jax.tree_util.tree_leaves(c.model.params)]
                tmp = cache / f"ckpt_{name}_{c.step}.tmp.npz"
                np.savez(tmp, config=config_id(name), n_leaves=len(leaves), loss=c.loss, accuracy=c.accuracy,
                         **{f"p{i}": a for i, a in enumerate(leaves)})
                os.replace(tmp, cache / f"ckpt_{name}_{c.step}.npz")
    return out


# ------------------------------------------------------------------------------------------------------ scoring
def fin(v):
    """JSON-safe float (NaN / inf -> None)."""
    v = float(v)
    return v if math.isfinite(v) else None


def psnr_list(rec_images, x):
    p = np.asarray(metrics.psnr(jnp.clip(rec_images, 0.0, 1.0), x), np.float64).reshape(-1)
    return [float(min(v, PSNR_CAP)) if not math.isnan(v) else None for v in p]


def grey_psnr(x):
    mean = jnp.mean(x, axis=(1, 2), keepdims=True) * jnp.ones_like(x)
    return psnr_list(mean, x)


def layer_evals(rec) -> list[int]:
    """Gradient evaluations per target of a layer-wise attack: LSMR iterations + refinement steps over the layers."""
    total = 0
    for r in rec.layers:
        total = total + np.asarray(r.steps, np.int64)
        if r.refine_steps is not None:
            total = total + np.asarray(r.refine_steps, np.int64)
    return np.atleast_1d(total).astype(int).tolist()


def ig_evals(rec, log_every: int, restarts: int) -> list[int]:
    tr = np.atleast_2d(np.asarray(rec.loss_trace))
    out = []
    for t in tr:
        fin_idx = np.flatnonzero(np.isfinite(t))
        out.append(int((fin_idx[-1] + 1) * log_every * restarts) if fin_idx.size else 0)
    return out


def err_string(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:2000]


def timed(fn):
    t0 = time.perf_counter()
    rec = fn()
    jax.block_until_ready(rec.image)
    return rec, time.perf_counter() - t0


def true_layer_inputs(model, x, labels):
    """Every layer's true input ``x_{l-1}`` (input layer first) for each photo: ``[(T, *shape_l), ...]``."""
    from jaxinv.engine import layer_pass, loss_fn

    stages = model.structure().stages
    leaves = jax.tree_util.tree_leaves(model.params)
    lf = loss_fn("auto", model.num_outputs)
    return jax.vmap(lambda xi, yi: layer_pass(stages, leaves, xi[None], yi, lf)[0][:len(stages)])(x, labels)


def layer_diagnostics(rec, truth) -> dict:
    """Per layer (input layer first), mean over the photos: relative error of the recovered layer input against the
    truth, clipped activation values, forward / gradient residuals: where the chain breaks."""
    import warnings

    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)  # the head has no forward residual
    out = {"path": [r.path for r in rec.layers]}
    out["clipped"] = [float(np.mean(np.asarray(r.clipped))) for r in rec.layers]
    out["forward_residual"] = [fin(np.nanmean(np.asarray(r.forward_residual, np.float64))) for r in rec.layers]
    out["gradient_residual"] = [fin(np.nanmean(np.asarray(r.gradient_residual, np.float64))) for r in rec.layers]
    if truth is not None and rec.layer_inputs:
        errs = []
        for got, want in zip(rec.layer_inputs, truth):
            g = np.asarray(got, np.float64).reshape(want.shape[0], -1)
            w = np.asarray(want, np.float64).reshape(want.shape[0], -1)
            errs.append(fin(np.mean(np.linalg.norm(g - w, axis=1) / np.maximum(np.linalg.norm(w, axis=1), 1e-30))))
        out["input_rel_error"] = errs
    return out


def run_stacked(name, fn, x, n, truth=None):
    """One call on the stacked gradients of all photos."""
    try:
        rec, sec = timed(fn)
        out = {"psnr": psnr_list(rec.image, x), "seconds": sec, "seconds_per_photo": sec / n,
               "evaluations": layer_evals(rec),
               "gradient_distance": [fin(v) for v in np.atleast_1d(np.asarray(rec.gradient_distance))],
               "error": None}
        try:
            out["layers"] = layer_diagnostics(rec, truth)
        except Exception as err:  # diagnostics only
            out["layers"] = {"error": err_string(err)}
        return out
    except Exception as err:
        traceback.print_exc(file=sys.stderr)
        return {"psnr": [None] * n, "seconds": None, "seconds_per_photo": None, "evaluations": None,
                "error": err_string(err)}


def run_per_photo(fn, x, labels, evals):
    """One call per photo; a failure on one photo records its error and the others go on."""
    res = {"psnr": [], "seconds": [], "evaluations": [], "gradient_distance": [], "error": []}
    for i in range(x.shape[0]):
        try:
            rec, sec = timed(lambda: fn(i))
            res["psnr"].append(psnr_list(rec.image, x[i:i + 1])[0])
            res["seconds"].append(sec)
            res["evaluations"].append(evals(rec)[0])
            res["gradient_distance"].append(fin(np.asarray(rec.gradient_distance).reshape(-1)[0]))
            res["error"].append(None)
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            for k in ("psnr", "seconds", "evaluations", "gradient_distance"):
                res[k].append(None)
            res["error"].append(err_string(err))
    if not any(res["error"]):
        res["error"] = None
    return res


def security_summary(model) -> dict:
    try:
        from jaxinv._security import blamed_layer
    except ImportError:  # pragma: no cover - a later layout
        blamed_layer = None
    t0 = time.perf_counter()
    try:
        rep = jaxinv.security(model, key=jax.random.key(0))
    except Exception as err:
        traceback.print_exc(file=sys.stderr)
        return {"error": err_string(err), "score": None, "verdict": None, "category": None}
    blamed = blamed_layer(rep.layers) if blamed_layer is not None else None
    return {
        "score": fin(rep.score), "verdict": rep.verdict, "category": rep.verdict.split(":")[0].strip(),
        "copa_index": int(rep.copa_index), "rgap_index": int(rep.rgap_index),
        "blamed_layer": None if blamed is None else blamed.path,
        "layers": [{"path": r.path, "kind": r.kind, "activation": r.activation, "unknowns": r.unknowns,
                    "rank": r.rank, "deficiency": r.deficiency, "sigma_min": fin(r.sigma_min),
                    "lost_energy": fin(r.lost_energy), "inverse_gain": fin(r.inverse_gain)} for r in rep.layers],
        "seconds": time.perf_counter() - t0, "error": None,
    }


def category(db) -> str | None:
    if db is None:
        return None
    return "LEAKS" if db >= LEAK_DB else "PARTIAL" if db >= SAFE_DB else "RESISTANT"


def mean_or_none(vals):
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


# --------------------------------------------------------------------------------------------------- one point
def run_point(name, step, model, photos, x, attacks, args, log):
    n = x.shape[0]
    labels = jnp.asarray([i % n_labels(model) for i in range(n)], jnp.int32)
    grads = jax.vmap(lambda xi, yi: jaxinv.client_gradient(model, xi[None], yi[None]))(x, labels)
    one = lambda i: jax.tree_util.tree_map(lambda a: a[i], grads)  # noqa: E731
    res = {}
    try:
        truth = true_layer_inputs(model, x, labels)
    except Exception as err:
        log(f"  true layer inputs failed: {err_string(err)}")
        truth = None
    if "copa" in attacks:
        res["copa"] = run_stacked("copa", lambda: jaxinv.copa(model, grads, label=labels), x, n, truth)
    if "copa_pb" in attacks:
        res["copa_pb"] = run_stacked("copa_pb", lambda: jaxinv.copa(model, grads, label=labels, refine=True), x, n,
                                     truth)
    if "hybrid" in attacks:
        hy = {} if args.hybrid_steps is None else {"max_steps": args.hybrid_steps}
        res["hybrid"] = run_per_photo(lambda i: jaxinv.attack("hybrid", model, one(i), label=int(labels[i]), **hy),
                                      x, labels, layer_evals)
        res["hybrid"]["options"] = hy or "defaults"
    if "ig" in attacks:
        res["ig"] = run_per_photo(
            lambda i: jaxinv.attack("ig", model, one(i), label=int(labels[i]), key=jax.random.key(3),
                                    max_steps=args.ig_steps, tol=0.0),
            x, labels, lambda rec: ig_evals(rec, 10, 1))
        res["ig"]["options"] = {"max_steps": args.ig_steps, "tol": 0.0, "restarts": 1}
    grey = grey_psnr(x)
    best = []
    for i in range(n):
        vals = [res[a]["psnr"][i] for a in LAYERWISE if a in res and res[a]["psnr"][i] is not None]
        best.append(max(vals) if vals else None)
    return {"labels": labels.tolist(), "photos": list(photos), "attacks": res, "grey": grey, "best": best,
            "mean": {**{a: mean_or_none(res[a]["psnr"]) for a in res}, "grey": mean_or_none(grey),
                     "best": mean_or_none(best)}}


# ------------------------------------------------------------------------------------------------ aggregation
def spearman(a, b):
    try:
        from scipy.stats import spearmanr
        r = spearmanr(a, b).statistic
        return float(r)
    except ImportError:  # pragma: no cover
        def ranks(v):
            v = np.asarray(v, float)
            order = np.argsort(v, kind="mergesort")
            r = np.empty(len(v))
            r[order] = np.arange(len(v))
            for val in np.unique(v):  # average ties
                r[v == val] = r[v == val].mean()
            return r
        ra, rb = ranks(a), ranks(b)
        return float(np.corrcoef(ra, rb)[0, 1])


def agreement(points) -> dict:
    pts = [p for p in points if p["security"].get("score") is not None and p["mean"].get("best") is not None]
    out = {"points": len(pts)}
    if not pts:
        return out
    s = [p["security"]["score"] for p in pts]
    m = [p["mean"]["best"] for p in pts]
    out["spearman"] = spearman(s, m) if len(pts) >= 3 and len(set(s)) > 1 and len(set(m)) > 1 else None
    out["mean_abs_error_db"] = float(np.mean(np.abs(np.subtract(s, m))))
    out["mean_signed_error_db"] = float(np.mean(np.subtract(s, m)))  # > 0: the score is optimistic for the attacker
    out["same_verdict"] = float(np.mean([category(a) == category(b) for a, b in zip(s, m)]))
    best_grey = [(b, g) for p in pts for b, g in zip(p["best"], p["grey"]) if b is not None and g is not None]
    out["images"] = len(best_grey)
    out["frac_best_ge_grey"] = float(np.mean([b >= g for b, g in best_grey])) if best_grey else None
    best_ig = [(b, g) for p in pts if "ig" in p["attacks"]
               for b, g in zip(p["best"], p["attacks"]["ig"]["psnr"]) if b is not None and g is not None]
    out["frac_best_ge_ig"] = float(np.mean([b >= g for b, g in best_ig])) if best_ig else None
    out["ig_images"] = len(best_ig)
    return out


def f1(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def markdown(res) -> str:
    cfg = res["config"]
    pts = res["points"]
    L = [f"# Trained checkpoints: security score vs attacks{' (QUICK)' if cfg['quick'] else ''}", "",
         f"{res['environment']}. jaxinv from `{res['jaxinv_file']}` (git {res.get('git') or '?'}). Tag: "
         f"`{cfg['tag'] or '-'}`. Total wall time {res.get('total_seconds', 0):.0f} s"
         f"{'' if res.get('finished') else ' (UNFINISHED: partial results)'}"
         + (f"; security recomputed, attacks kept from `{cfg['rescored_from']}`" if cfg.get("rescored_from") else "")
         + (f", IG's from `{cfg['ig_from']}` (IG's code unchanged between the runs)" if cfg.get("ig_from") else "")
         + ".", "",
         f"Training: photo_task({TRAIN['n']}, key 0), Adam lr {TRAIN['lr']}, batch {TRAIN['batch_size']}, key "
         f"{TRAIN['train_key']}; held-out accuracy on photo_task({TRAIN['heldout_n']}, key 1) (4 classes, chance "
         f"0.25). Targets: {', '.join(cfg['photos'])} (whole 32x32 thumbnails, never trained on), photo i with "
         f"label i % n_labels, float32 gradient of one image, labels given. PSNR in dB on [0, 1] (reconstructions "
         f"clipped). copa / copa_pb: one stacked call; hybrid: defaults"
         f"{'' if cfg['hybrid_steps'] is None else ' with max_steps=' + str(cfg['hybrid_steps'])}; IG: "
         f"{cfg['ig_steps']} signed-Adam steps, tol 0. grey: constant image at the true per-channel mean. "
         f"best = max(copa, copa_pb, hybrid). Seconds: per photo (copa: the stacked call / photos; hybrid, IG: "
         f"mean per call, the first including compilation).", "",
         "| arch | step | train acc | held-out acc | score | verdict | blamed layer | copa | copa_pb | hybrid | ig | "
         "grey | best | s copa / pb / hybrid / ig |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in pts:
        sec = p["security"]
        m = p["mean"]
        a = p["attacks"]

        def secs(k):
            if k not in a:
                return "-"
            v = a[k].get("seconds_per_photo") if k in ("copa", "copa_pb") else mean_or_none(a[k]["seconds"])
            return f1(v, "{:.0f}") if v is None or v >= 1 else f1(v, "{:.1f}")

        errs = [k for k in a if a[k].get("error")]
        L.append(f"| {p['arch']} | {p['step']} | {f1(p['train_accuracy'], '{:.2f}')} | {f1(p['heldout_accuracy'], '{:.2f}')} | "
                 f"{f1(sec.get('score'))} | {sec.get('category') or 'error'} | {sec.get('blamed_layer') or '-'} | "
                 + " | ".join(f1(m.get(k)) for k in ATTACKS) + f" | {f1(m.get('grey'))} | **{f1(m.get('best'))}** | "
                 + " / ".join(secs(k) for k in ATTACKS)
                 + (f" (errors: {', '.join(errs)})" if errs else "") + " |")
    L += ["", "## Metric vs attack agreement (per point: score vs mean best layer-wise PSNR over the photos)", "",
          "| checkpoints | points | Spearman | mean abs(score - PSNR) dB | mean (score - PSNR) dB | same verdict "
          "| images best >= grey | images best >= IG |", "|---|---|---|---|---|---|---|---|"]
    for label, key in (("trained (step > 0)", "trained"), ("step 0 (init)", "init"), ("all", "all")):
        g = res["agreement"].get(key, {})
        L.append(f"| {label} | {g.get('points', 0)} | {f1(g.get('spearman'), '{:.2f}')} | "
                 f"{f1(g.get('mean_abs_error_db'))} | {f1(g.get('mean_signed_error_db'), '{:+.1f}')} | "
                 f"{f1(g.get('same_verdict'), '{:.2f}')} | {f1(g.get('frac_best_ge_grey'), '{:.2f}')} "
                 f"({g.get('images', 0)}) | {f1(g.get('frac_best_ge_ig'), '{:.2f}')} ({g.get('ig_images', 0)}) |")
    by_step = res["agreement"].get("by_step", {})
    if by_step:
        L += ["", "Per checkpoint step:", "", "| step | points | Spearman | mean abs err dB | same verdict | "
              "best >= grey | best >= IG | mean best | mean score |", "|---|---|---|---|---|---|---|---|---|"]
        for s, g in by_step.items():
            L.append(f"| {s} | {g.get('points', 0)} | {f1(g.get('spearman'), '{:.2f}')} | "
                     f"{f1(g.get('mean_abs_error_db'))} | {f1(g.get('same_verdict'), '{:.2f}')} | "
                     f"{f1(g.get('frac_best_ge_grey'), '{:.2f}')} | {f1(g.get('frac_best_ge_ig'), '{:.2f}')} | "
                     f"{f1(g.get('mean_best'))} | {f1(g.get('mean_score'))} |")
    L += ["", "## Per photo (best layer-wise PSNR / IG / grey, dB)", "",
          "| arch | step | " + " | ".join(cfg["photos"]) + " |", "|---|---|" + "---|" * len(cfg["photos"])]
    for p in pts:
        ig = p["attacks"].get("ig", {}).get("psnr", [None] * len(p["best"]))
        L.append(f"| {p['arch']} | {p['step']} | " + " | ".join(
            f"{f1(b)} / {f1(i)} / {f1(g)}" for b, i, g in zip(p["best"], ig, p["grey"])) + " |")
    L += ["", "## Where copa's chain breaks: relative error of each recovered layer input (input layer first; "
          "mean over photos) / clipped activation values", "", "| arch | step | copa | copa_pb |", "|---|---|---|---|"]
    for p in pts:
        cells = []
        for k in ("copa", "copa_pb"):
            lay = p["attacks"].get(k, {}).get("layers") or {}
            if "input_rel_error" in lay:
                cells.append(" / ".join(f1(e, "{:.1e}") for e in lay["input_rel_error"])
                             + "; clipped " + " / ".join(f"{c:.0f}" for c in lay["clipped"]))
            else:
                cells.append("-")
        L.append(f"| {p['arch']} | {p['step']} | " + " | ".join(cells) + " |")
    errors = [(p["arch"], p["step"], k, e) for p in pts for k, v in p["attacks"].items()
              for e in ([v["error"]] if isinstance(v.get("error"), str) else (v.get("error") or [])) if e]
    errors += [(p["arch"], p["step"], "security", p["security"]["error"]) for p in pts if p["security"].get("error")]
    if errors:
        L += ["", "## Errors", ""] + [f"* {a} step {s} {k}: `{e[:300]}`" for a, s, k, e in errors]
    return "\n".join(L) + "\n"


def aggregate(res):
    pts = res["points"]
    trained = [p for p in pts if p["step"] > 0]
    init = [p for p in pts if p["step"] == 0]
    by_step = {}
    for s in sorted({p["step"] for p in pts}):
        sp = [p for p in pts if p["step"] == s]
        g = agreement(sp)
        g["mean_best"] = mean_or_none([p["mean"].get("best") for p in sp])
        g["mean_score"] = mean_or_none([p["security"].get("score") for p in sp])
        by_step[str(s)] = g
    res["agreement"] = {"trained": agreement(trained), "init": agreement(init), "all": agreement(pts),
                        "by_step": by_step}


def write(res, stem: Path):
    aggregate(res)
    tmp = stem.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, stem.with_suffix(".json"))
    with open(stem.with_suffix(".md"), "w") as f:
        f.write(markdown(res))


def git_head():
    try:
        import subprocess
        root = Path(jaxinv.__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "jaxinv"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" + uncommitted changes in jaxinv/" if dirty else "")
    except Exception:
        return None


# --------------------------------------------------------------------------------------------------------- main
def with_ig(point, ig_points) -> dict:
    """``point`` with IG's result from ``ig_points`` (``{(arch, step): point}``) where it has none."""
    q = ig_points.get((point["arch"], point["step"]))
    if "ig" in point["attacks"] or q is None or "ig" not in q["attacks"]:
        return point
    if q.get("photos") != point.get("photos") or q.get("labels") != point.get("labels"):
        return point
    return {**point, "attacks": {**point["attacks"], "ig": q["attacks"]["ig"]},
            "mean": {**point["mean"], "ig": mean_or_none(q["attacks"]["ig"]["psnr"])}}


def merge(res, sources: list[Path], stem: Path, log, ig_from: Path | None = None):
    """The points of ``sources``, a later file's point replacing an earlier one's of the same (arch, step); IG's
    filled in from ``ig_from`` where missing. The configuration is the first source's, with the sources listed."""
    outs = [json.loads(p.read_text()) for p in sources]
    ig_points = {} if ig_from is None else {(p["arch"], p["step"]): p
                                            for p in json.loads(ig_from.read_text())["points"]}
    points = {}
    for o in outs:
        for p in o["points"]:
            points[(p["arch"], p["step"])] = with_ig(p, ig_points)
    res["config"] = {**outs[0]["config"], "tag": res["config"]["tag"], "merged_from": [str(p) for p in sources],
                     "ig_from": None if ig_from is None else str(ig_from)}
    res["git"] = " / ".join(str(o.get("git")) for o in outs)
    res["points"] = list(points.values())
    res["finished"] = True
    write(res, stem)
    log(f"merged {len(res['points'])} points into {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


def rescore(res, source: Path, archs, steps, done, train_task, cache, stem, log, ig_from: Path | None = None):
    """The points of ``source`` with their security analysis recomputed by this jaxinv (attacks kept; IG's
    filled in from ``ig_from`` where missing)."""
    old = json.loads(source.read_text())
    ig_points = {} if ig_from is None else {(p["arch"], p["step"]): p
                                            for p in json.loads(ig_from.read_text())["points"]}
    res["config"] = {**old["config"], "tag": res["config"]["tag"], "rescored_from": str(source),
                     "ig_from": None if ig_from is None else str(ig_from)}
    res["points"] = [with_ig(p, ig_points) for p in res["points"]]
    t_start = time.perf_counter()
    for p in old["points"]:
        if p["arch"] not in archs or p["step"] not in steps or (p["arch"], p["step"]) in done:
            continue
        model = checkpoints(p["arch"], (p["step"],), train_task, cache, log)[p["step"]][0]
        sec = security_summary(model)
        res["points"].append(with_ig({**p, "security": sec}, ig_points))
        res["total_seconds"] = time.perf_counter() - t_start
        write(res, stem)
        log(f"{p['arch']:<13} step {p['step']:>4}  score {f1(sec.get('score')):>5} "
            f"{(sec.get('category') or 'ERR'):<9} best {f1(p['mean'].get('best'))}  ({sec.get('seconds', 0):.0f} s)")
    res["finished"] = True
    write(res, stem)
    log(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="archs cnn2_c1, cnn6_head10, lenet; steps 0, 300; "
                    "2 photos; IG 200 steps")
    ap.add_argument("--archs", help="comma-separated architectures (default: all 8)")
    ap.add_argument("--steps", help="comma-separated checkpoint steps (default 0,100,300,1000)")
    ap.add_argument("--photos", type=int, help="number of held-out photos (default 4)")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="subset of copa,copa_pb,hybrid,ig")
    ap.add_argument("--ig-steps", type=int, help="IG's fixed budget (default 1000; 200 with --quick)")
    ap.add_argument("--hybrid-steps", help="hybrid max_steps: one int or a triple a,b,c (default: its defaults)")
    ap.add_argument("--out", default=str(OUT), help="output folder (default benchmarks/out)")
    ap.add_argument("--tag", default="", help="output name trained_<tag>.json / .md (default trained.json)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "jaxinv_bench"), help="checkpoint cache")
    ap.add_argument("--no-cache", action="store_true", help="train every checkpoint afresh, write no cache")
    ap.add_argument("--resume", action="store_true", help="keep the points already in the output JSON")
    ap.add_argument("--rescore", metavar="JSON", help="recompute only the security analysis; every attack result "
                    "(and accuracy) is kept from this earlier output (the attacks do not depend on the metric)")
    ap.add_argument("--merge", metavar="JSON", nargs="+", help="run nothing: write the points of these outputs "
                    "(a later file's point replaces an earlier one's of the same arch and step) to --tag's output")
    ap.add_argument("--ig-from", metavar="JSON", help="with --rescore or --merge: IG's results taken from this "
                    "earlier output where the kept one has none (same arch, step, photos and labels; only valid when IG's code has "
                    "not changed between the two runs)")
    args = ap.parse_args(argv)

    if args.ig_from and not (args.rescore or args.merge):
        ap.error("--ig-from fills in IG's results of a rescored or merged output: give --rescore or --merge as well")
    if args.merge and (args.rescore or args.resume):
        ap.error("--merge runs nothing: it cannot be combined with --rescore or --resume")
    archs = tuple(args.archs.split(",")) if args.archs else (QUICK_ARCHS if args.quick else ARCHS)
    steps = tuple(int(s) for s in args.steps.split(",")) if args.steps else (QUICK_STEPS if args.quick else STEPS)
    n_photos = args.photos if args.photos is not None else (2 if args.quick else len(HELD_OUT))
    if not 1 <= n_photos <= len(HELD_OUT):
        ap.error(f"--photos must be in 1..{len(HELD_OUT)}")
    attacks = tuple(a for a in args.attacks.split(",") if a)
    bad = [a for a in attacks if a not in ATTACKS]
    if bad:
        ap.error(f"unknown attacks {bad}; choose from {ATTACKS}")
    args.ig_steps = args.ig_steps or (200 if args.quick else 1000)
    if args.hybrid_steps is not None:
        v = [int(s) for s in args.hybrid_steps.split(",")]
        args.hybrid_steps = v[0] if len(v) == 1 else tuple(v)
    for a in archs:
        if a not in RELU_MODELS and a not in zoo.names():
            ap.error(f"unknown architecture {a!r}; choose from {zoo.names() + tuple(RELU_MODELS)}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / (f"trained_{args.tag}" if args.tag else "trained")
    cache = None if args.no_cache else Path(args.cache).expanduser()
    photos = HELD_OUT[:n_photos]
    x = jnp.stack([data.load_photo(p, size=TRAIN["size"]) for p in photos]).astype(jnp.float32)

    def log(msg):
        print(msg, flush=True)

    log(f"jaxinv imported from {jaxinv.__file__}")
    config = {"archs": list(archs), "steps": list(steps), "photos": list(photos), "attacks": list(attacks),
              "ig_steps": args.ig_steps, "hybrid_steps": args.hybrid_steps, "quick": args.quick, "tag": args.tag,
              "train": TRAIN, "relu_models": {k: [list(map(list, v[0])), v[1], v[2]] for k, v in RELU_MODELS.items()},
              "label_rule": "photo i gets label i % n_labels", "psnr_cap": PSNR_CAP}
    res = {"config": config, "environment": f"{os.cpu_count()} CPUs, {platform.machine()}, python "
           f"{platform.python_version()}, jax {jax.__version__}, backend {jax.default_backend()}",
           "jaxinv_file": jaxinv.__file__, "git": git_head(), "points": [], "finished": False}
    done = set()
    if args.resume and stem.with_suffix(".json").exists():
        old = json.loads(stem.with_suffix(".json").read_text())
        same = {k: v for k, v in old.get("config", {}).items() if k not in ("archs", "steps")} == \
               {k: v for k, v in json.loads(json.dumps(config)).items() if k not in ("archs", "steps")}
        if args.rescore:  # a rescored output keeps its source's configuration
            same = old.get("config", {}).get("rescored_from") == args.rescore
        if same:
            res["points"] = old["points"]
            done = {(p["arch"], p["step"]) for p in old["points"]}
            log(f"resuming: {len(done)} points kept from {stem.with_suffix('.json')}")
        else:
            log("--resume: the existing output has another configuration; starting afresh")

    if args.merge:
        merge(res, [Path(p) for p in args.merge], stem, log, ig_from=Path(args.ig_from) if args.ig_from else None)
        return
    t_start = time.perf_counter()
    train_task = data.photo_task(TRAIN["n"], size=TRAIN["size"], key=jax.random.key(TRAIN["task_key"]))
    held = data.photo_task(TRAIN["heldout_n"], size=TRAIN["size"], key=jax.random.key(TRAIN["heldout_key"]))
    if args.rescore:
        rescore(res, Path(args.rescore), archs, steps, done, train_task, cache, stem, log,
                ig_from=Path(args.ig_from) if args.ig_from else None)
        return
    for name in archs:
        todo = [s for s in steps if (name, s) not in done]
        if not todo:
            continue
        log(f"== {name}")
        try:
            ckpts = checkpoints(name, todo, train_task, cache, log)
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            log(f"  {name}: training failed: {err_string(err)}")
            for s in todo:
                res["points"].append({"arch": name, "step": s, "error": err_string(err), "train_accuracy": None,
                                      "heldout_accuracy": None, "security": {"error": err_string(err)},
                                      "attacks": {}, "best": [], "grey": [], "mean": {}})
            write(res, stem)
            continue
        for s in todo:
            model, loss, acc, train_sec, cached = ckpts[s]
            t0 = time.perf_counter()
            held_acc = zoo.accuracy(model, held.images, task_labels(model, held.labels))
            sec = security_summary(model)
            point = {"arch": name, "step": s, "train_loss": loss, "train_accuracy": acc, "heldout_accuracy": held_acc,
                     "train_seconds": train_sec, "cached": cached, "security": sec}
            point.update(run_point(name, s, model, photos, x, attacks, args, log))
            point["seconds"] = time.perf_counter() - t0
            res["points"].append(point)
            res["total_seconds"] = time.perf_counter() - t_start
            write(res, stem)
            m = point["mean"]
            log(f"{name:<13} step {s:>4}  acc {acc:.2f}/{held_acc:.2f}  score {f1(sec.get('score')):>5} "
                f"{(sec.get('category') or 'ERR'):<9}  " + " ".join(f"{k} {f1(m.get(k)):>5}" for k in attacks)
                + f"  grey {f1(m.get('grey'))}  best {f1(m.get('best'))}  ({point['seconds']:.0f} s)"
                + "".join(f"  [{k} ERROR]" for k, v in point["attacks"].items() if v.get("error")))
    res["finished"] = True
    res["total_seconds"] = time.perf_counter() - t_start
    write(res, stem)
    log(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()

"""Benchmark of jaxinv.security: the reference COPA indices, validity of the score, and a large layer.

(a) COPA index and per-layer deficiencies of every architecture of design/architectures.md against the reference
    values (the authors' weights were PyTorch's default init with seed 10 and a real image; ours: the same
    distribution from jax.random.key(10) and a uniform random image -- ranks are generic), with the time per model.
(b) Validity: for >= 16 architectures (the zoo plus variants built with zoo.make_cnn), the PSNR of the layer-wise
    attack (jaxinv.copa; clipped to [0, 1], data range 1, standard PSNR) on 4 real photos each
    (jaxinv.data.sample_images), against .score, .copa_index and .rgap_index (Spearman). The score's constants were
    fitted on the zoo rows only; the variants are held out.
(c) Timing of a ResNet-style stem (3x224x224 input, conv 7x7, stride 2, 64 channels, padding 3).

Run from the repository root:  python benchmarks/bench_security.py [--fresh] [--skip-attacks] [--quick]
Writes benchmarks/out/security.json, benchmarks/out/security.md and benchmarks/out/security_scatter.png.
Attack results are cached in benchmarks/out/security_attacks.json (--fresh recomputes them).
``--quick`` runs (a) and (c) only (no attacks), prints the COPA-index matches and the total time, writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

import jaxinv
from jaxinv import data, metrics, zoo
from jaxinv._security import count_conv_rank, rgap_analysis, security

OUT = Path(__file__).resolve().parent / "out"

# design/architectures.md: COPA index (dense re-derivation of the authors' systems)
REFERENCE = {
    "cnn2_c0": -2821, "cnn2_c1": 0, "cnn2_c2": -1470, "cnn2_c4": -2146, "cnn2_c5": 0, "cnn2_c6": -189,
    "cnn3_c1": -2266, "cnn3_c2": -1995, "cnn3_c3": 0, "cnn3_c4": -2146, "cnn3_c8": -3544, "cnn3_c9": 0,
    "cnn4_c1": -2772, "cnn4_c2": -6211, "cnn4_c3": -220, "lenet": 0, "lenet_dlg": 0, "cnn6": 0, "cnn6_d": -233,
}  # fmt: skip
# per-layer rank deficits given there (None: not given), input layer first, head excluded
REFERENCE_LAYERS = {
    "cnn3_c1": [0, -4533], "cnn4_c1": [0, -3965, -386], "cnn4_c2": [None, -9316, None],
    "cnn6_d": [None, -280, None, None, None, None],
}
# architectures of architectures.md without a printed index (reported, not compared)
OTHER_PAPER = ["cnn2_c11", "cnn2_c21", "cnn2_c41", "cnn3_c6", "cnn3_c7", "cnn3_c11"]

T, I, LR2 = "tanh", "identity", "leaky_relu:0.2"
# held-out variants: (convs (out, kernel, stride, padding), activations, make_cnn keywords)
VARIANTS = {
    "v_c1_k3s1": ([(1, 3, 1, 0)], [T, T], {}),
    "v_c2_k3s1": ([(2, 3, 1, 0)], [T, I], {}),
    "v_c3_k3s1": ([(3, 3, 1, 0)], [T, I], {}),
    "v_c4_k3s1": ([(4, 3, 1, 0)], [T, I], {}),
    "v_c6_k3s2": ([(6, 3, 2, 0)], [T, I], {}),
    "v_c12_k3s2": ([(12, 3, 2, 0)], [T, I], {}),
    "v_c24_k3s2": ([(24, 3, 2, 1)], [T, I], {}),
    "v_c6_k5s1": ([(6, 5, 1, 0)], [T, I], {}),
    "v_c3_k5s1p2": ([(3, 5, 1, 2)], [T, I], {}),
    "v_c12_k7s3": ([(12, 7, 3, 0)], [T, I], {}),
    "v_deep3_s1": ([(6, 3, 1, 0), (6, 3, 1, 0), (6, 3, 1, 0)], [T, T, T, I], {}),
    "v_deep3_s2": ([(12, 4, 2, 1), (24, 4, 2, 1), (48, 4, 2, 1)], [LR2, LR2, LR2, I], {}),
    "v_deep4_mix": ([(8, 3, 1, 1), (8, 3, 2, 1), (16, 3, 1, 1), (16, 3, 2, 1)], [T, T, T, T, I], {}),
    "v_cnn3_w12": ([(6, 3, 1, 0), (12, 4, 2, 0)], [T, T, I], {}),
    "v_cnn3_w24": ([(6, 3, 1, 0), (24, 4, 2, 0)], [T, T, I], {}),
    "v_cnn3_s1": ([(6, 3, 1, 0), (3, 4, 1, 0)], [T, T, I], {}),
    "v_cnn3_sigmoid": ([(6, 3, 1, 0), (3, 4, 2, 0)], ["sigmoid", "sigmoid", I], {}),
    "v_cnn3_elu": ([(6, 3, 1, 0), (3, 4, 2, 0)], ["elu", "elu", I], {}),
    "v_cnn3_softplus": ([(6, 3, 1, 0), (3, 4, 2, 0)], ["softplus", "softplus", I], {}),
    "v_cnn3_lrelu": ([(6, 3, 1, 0), (3, 4, 2, 0)], [LR2, LR2, I], {}),
    "v_cnn2_relu": ([(12, 3, 1, 1)], ["relu", I], {}),
    "v_cnn3_bias": ([(6, 3, 1, 0), (3, 4, 2, 0)], [T, T, I], {"conv_bias": True}),
    "v_cnn2_c1_k100": ([(6, 3, 1, 0)], [T, I], {"num_classes": 100}),
    "v_cnn2_c1_k2": ([(6, 3, 1, 0)], [T, I], {"num_classes": 2}),
}
N_IMAGES = 4


def build(name: str, seed: int):
    if name in VARIANTS:
        convs, acts, kw = VARIANTS[name]
        kw = dict(kw)
        kw.setdefault("num_classes", 10)
        module = zoo.make_cnn(convs, acts, **kw)
        shape = (32, 32, 3)
        variables = module.init(jax.random.key(seed), jnp.zeros((1,) + shape))
    else:
        shape = zoo.input_shape(name)
        module, variables = zoo.build(name, key=jax.random.key(seed))
    return jaxinv.from_linen(module, variables, input_shape=shape, name=name), shape


def timed_security(model, key):
    """Wall and CPU seconds (all threads) of one analysis; the CPU time does not depend on other processes' load."""
    t, c = time.perf_counter(), time.process_time()
    rep = security(model, key=key)
    return rep, time.perf_counter() - t, time.process_time() - c


# ------------------------------------------------------------------------------------------------ (a)
def part_a() -> list[dict]:
    rows = []
    for name in list(REFERENCE) + OTHER_PAPER:
        t0 = time.perf_counter()
        model, _ = build(name, seed=10)
        t_build = time.perf_counter() - t0
        rep, t_sec, c_sec = timed_security(model, jax.random.key(0))
        hidden = rep.layers[:-1]
        ref_layers = REFERENCE_LAYERS.get(name)
        layer_ok = None
        if ref_layers is not None:
            layer_ok = all(r is None or r == h.rank_deficit for r, h in zip(ref_layers, hidden))
        rows.append({
            "name": name, "copa_index": rep.copa_index, "reference": REFERENCE.get(name),
            "match": (rep.copa_index == REFERENCE[name]) if name in REFERENCE else None,
            "rank_deficits": [h.rank_deficit for h in hidden],
            "ranks": [f"{h.rank}/{h.unknowns}" for h in hidden],
            "ranks_padded": [f"{h.rank + h.padding_rows}/{h.unknowns + h.padding_rows}" for h in hidden],
            "reference_layers": ref_layers, "layers_match": layer_ok,
            "exact": all(h.exact for h in rep.layers), "rgap_index": rep.rgap_index, "score": rep.score,
            "seconds": t_sec, "cpu_seconds": c_sec, "build_seconds": t_build,
        })
        print(f"(a) {name:10s} copa {rep.copa_index:6d} ref {REFERENCE.get(name)} {t_sec:5.1f}s (cpu {c_sec:.1f}s)",
              flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ (b)
def attack_psnr(model, shape, attacks: tuple[str, ...]) -> dict[str, list[float]]:
    """PSNR per image of each attack (reconstruction clipped to [0, 1], data range 1); ``copa_pb`` is COPA with the
    pull-back constraints (``refine=True``; plain COPA on models with blocks, which refuse it)."""
    X = data.sample_images(N_IMAGES, size=shape[0], key=jax.random.key(5))
    if shape[-1] == 1:
        X = X.mean(-1, keepdims=True)
    k = model.num_outputs
    y = (jnp.arange(N_IMAGES) * 3 + 1) % (2 if k == 1 else k)
    grads = jax.vmap(lambda xi, yi: jaxinv.client_gradient(model, xi[None], yi[None]))(X, y)
    out = {}
    for name in attacks:
        if name == "copa":
            rec = jaxinv.copa(model, grads, label=y)
        elif name == "copa_pb":
            rec = jaxinv.copa(model, grads, label=y, refine=not model.structure(shape).blocks)
        else:
            rec = jaxinv.attack(name, model, grads, label=y, key=jax.random.key(7))
        out[name] = [float(v) for v in metrics.psnr(jnp.clip(jnp.nan_to_num(rec.image), 0.0, 1.0), X)]
    return out


def part_b(fresh: bool, skip_attacks: bool, attacks: tuple[str, ...]) -> tuple[list[dict], dict]:
    cache_path = OUT / "security_attacks.json"
    cache = {} if fresh or not cache_path.exists() else json.loads(cache_path.read_text())
    rows = []
    names = list(zoo.names()) + list(VARIANTS)
    for name in names:
        model, shape = build(name, seed=1)
        entry = cache.get(name, {})
        by = entry.get("by_attack", {"copa": entry["psnr"]} if "psnr" in entry else {})
        missing = tuple(a for a in attacks if a not in by)
        if missing and not skip_attacks:
            t = time.perf_counter()
            by.update(attack_psnr(model, shape, missing))
            entry = {"by_attack": by, "attack_seconds": entry.get("attack_seconds", 0.0) + time.perf_counter() - t}
            cache[name] = entry
            cache_path.write_text(json.dumps(cache, indent=1))
        if by and all(a in by for a in attacks):  # the best attack on each image
            cache[name]["psnr"] = [max(v) for v in zip(*(by[a] for a in attacks))]
        rep, t_sec, c_sec = timed_security(model, jax.random.key(0))
        ps = cache.get(name, {}).get("psnr")
        row = {
            "name": name, "set": "variant (held out)" if name in VARIANTS else "zoo (fit)",
            "psnr_mean": float(np.mean(ps)) if ps else None, "psnr": ps, "score": rep.score,
            "copa_index": rep.copa_index, "rgap_index": rep.rgap_index, "verdict": rep.verdict.split(":")[0],
            "rgap_output_side": rgap_analysis(rep.layers, "output_side")[0],
            "rgap_none": rgap_analysis(rep.layers, "none")[0],
            "deficiencies": [h.deficiency for h in rep.layers[:-1]], "seconds": t_sec, "cpu_seconds": c_sec,
        }
        # counting rules vs exact ranks, per plain conv layer
        agree = []
        for h, L in zip(rep.layers[:-1], model.layers()[:-1]):
            if L.kind == "conv" and L.activation != "relu":
                c = count_conv_rank(L.in_shape[:2], L.in_shape[2], L.kernel_shape[3], L.kernel_shape[:2], L.strides,
                                    L.padding, L.dilation)
                agree.append(c["rank"] == h.rank)
        row["counting_agrees"] = agree
        rows.append(row)
        print(f"(b) {name:16s} psnr {row['psnr_mean'] if ps else float('nan'):6.1f} score {rep.score:6.1f} "
              f"copa {rep.copa_index:6d} rgap {rep.rgap_index:6d} {t_sec:5.1f}s", flush=True)
    have = [r for r in rows if r["psnr_mean"] is not None]

    def rho(subset, key):
        if len(subset) < 3:
            return None
        return float(scipy.stats.spearmanr([r[key] for r in subset], [r["psnr_mean"] for r in subset])[0])

    stats = {}
    for label, subset in [("all", have), ("zoo (fit)", [r for r in have if r["name"] not in VARIANTS]),
                          ("variants (held out)", [r for r in have if r["name"] in VARIANTS])]:
        stats[label] = {"n": len(subset), "score": rho(subset, "score"), "copa_index": rho(subset, "copa_index"),
                        "rgap_index": rho(subset, "rgap_index"), "rgap_output_side": rho(subset, "rgap_output_side"),
                        "rgap_none": rho(subset, "rgap_none")}
    flat = [a for r in rows for a in r["counting_agrees"]]
    stats["counting_rule_agreement"] = f"{sum(flat)}/{len(flat)} conv layers"
    return rows, stats


# ------------------------------------------------------------------------------------------------ (c)
def part_c() -> list[dict]:
    rows = []
    for act in ("leaky_relu", "relu"):
        module = zoo.make_cnn([(64, 7, 2, 3)], [act, "identity"], num_classes=10)
        variables = module.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
        t = time.perf_counter()
        model = jaxinv.from_linen(module, variables, input_shape=(224, 224, 3), name=f"stem_{act}")
        t_build = time.perf_counter() - t
        rep, t_sec, c_sec = timed_security(model, jax.random.key(0))
        stem = rep.layers[0]
        rows.append({"activation": act, "seconds": t_sec, "cpu_seconds": c_sec, "build_seconds": t_build,
                     "unknowns": stem.unknowns,
                     "forward_rows": stem.forward_rows, "rank": stem.rank, "deficiency": stem.deficiency,
                     "exact": stem.exact, "method": stem.method, "layer_seconds": stem.seconds})
        print(f"(c) stem {act}: {t_sec:.1f}s (cpu {c_sec:.1f}s) rank {stem.rank}/{stem.unknowns} {stem.method}",
              flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ output
def markdown(res: dict) -> str:
    L = [f"# jaxinv.security benchmark\n\n{res['machine']}\n", "## (a) COPA index vs design/architectures.md\n",
         "| model | COPA index | reference | match | rank deficits (input layer first) | padded ranks | R-GAP index "
         "| wall s | CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["a"]:
        m = "" if r["match"] is None else ("yes" if r["match"] else "**NO**")
        if r["layers_match"] is not None:
            m += " (layers " + ("yes" if r["layers_match"] else "**NO**") + ")"
        L.append(f"| {r['name']} | {r['copa_index']} | {r['reference'] if r['reference'] is not None else '-'} | {m} "
                 f"| {r['rank_deficits']} | {', '.join(r['ranks_padded'])} | {r['rgap_index']} | {r['seconds']:.1f} "
                 f"| {r['cpu_seconds']:.1f} |")
    L += ["\n## (b) Score vs measured attack PSNR\n",
          f"PSNR: best of {res.get('attacks', 'copa')} per image, reconstruction clipped to [0, 1], standard PSNR "
          "(data range 1), mean of "
          f"{N_IMAGES} photos (jaxinv.data.sample_images, key 5).\n",
          "| set | n | Spearman(score) | Spearman(COPA index) | Spearman(R-GAP index) | R-GAP, output-side virtual "
          "| R-GAP, no virtual |", "|---|---|---|---|---|---|---|"]
    for k, v in res["b_stats"].items():
        if isinstance(v, dict):
            L.append(f"| {k} | {v['n']} | {v['score']:.3f} | {v['copa_index']:.3f} | {v['rgap_index']:.3f} | "
                     f"{v['rgap_output_side']:.3f} | {v['rgap_none']:.3f} |")
    L.append(f"\nCounting rules reproduce the exact stacked rank on {res['b_stats']['counting_rule_agreement']}.\n")
    L += ["| model | set | PSNR (dB) | score (dB) | COPA | R-GAP | verdict | deficiencies | wall s | CPU s |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(res["b"], key=lambda r: -(r["psnr_mean"] or -1e9)):
        p = "-" if r["psnr_mean"] is None else f"{r['psnr_mean']:.1f}"
        L.append(f"| {r['name']} | {r['set']} | {p} | {r['score']:.1f} | {r['copa_index']} | {r['rgap_index']} | "
                 f"{r['verdict']} | {r['deficiencies']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} |")
    L += ["\n## (c) Large layer: ResNet-style stem on 3x224x224\n",
          "| activation | wall s | CPU s | rank | deficiency | exact | method |", "|---|---|---|---|---|---|---|"]
    for r in res["c"]:
        L.append(f"| {r['activation']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['rank']}/{r['unknowns']} | "
                 f"{r['deficiency']} | {r['exact']} | {r['method']} |")
    return "\n".join(L) + "\n"


def scatter(res: dict):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib not installed: no plot")
        return
    rows = [r for r in res["b"] if r["psnr_mean"] is not None]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, label in zip(axes, ("score", "copa_index", "rgap_index"),
                              ("score (predicted PSNR, dB)", "COPA index", "R-GAP index")):
        for subset, color, name in ((False, "tab:blue", "zoo (fit)"), (True, "tab:orange", "variants (held out)")):
            pts = [r for r in rows if (r["name"] in VARIANTS) == subset]
            ax.scatter([r[key] for r in pts], [r["psnr_mean"] for r in pts], c=color, label=name, s=22)
        rho = res["b_stats"]["all"][key]
        ax.set_xlabel(label)
        ax.set_ylabel(f"measured PSNR, {res.get('attacks', 'copa')} (dB)")
        ax.set_title(f"Spearman {rho:.3f}")
        if key == "score":
            lim = [0, max(max(r["psnr_mean"] for r in rows), max(r["score"] for r in rows)) + 5]
            ax.plot(lim, lim, "k:", lw=0.8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "security_scatter.png", dpi=120)


def quick():
    """(a) and (c) without writing: the reference COPA indices and the time of the analyses."""
    t = time.perf_counter()
    a, c = part_a(), part_c()
    matched = [r["match"] for r in a if r["match"] is not None]
    wall = sum(r["seconds"] for r in a + c)
    cpu = sum(r["cpu_seconds"] for r in a + c)
    print(f"quick: COPA index {sum(matched)}/{len(matched)} references matched; security() {wall:.1f} s wall "
          f"({cpu:.1f} s CPU) over {len(a) + len(c)} models; whole run {time.perf_counter() - t:.1f} s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fresh", action="store_true", help="recompute the attack PSNRs")
    ap.add_argument("--skip-attacks", action="store_true", help="only use cached attack PSNRs")
    ap.add_argument("--parts", default="abc")
    ap.add_argument("--quick", action="store_true",
                    help="(a) and (c) only, no attacks; print the index matches and the total time, write nothing")
    ap.add_argument("--attacks", default="copa",
                    help="comma-separated registry attacks or copa_pb (COPA + pull-back); the PSNR of an image is "
                         "the best of them (default copa)")
    args = ap.parse_args()
    if args.quick:
        quick()
        return
    OUT.mkdir(parents=True, exist_ok=True)
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}; "
                      f"load average at start {os.getloadavg()[0]:.1f}"}
    prev = OUT / "security.json"
    if prev.exists():
        old = json.loads(prev.read_text())
        res.update({k: old[k] for k in ("a", "b", "b_stats", "c") if k in old})
    if "a" in args.parts:
        res["a"] = part_a()
    if "b" in args.parts:
        res["attacks"] = args.attacks
        res["b"], res["b_stats"] = part_b(args.fresh, args.skip_attacks, tuple(args.attacks.split(",")))
    if "c" in args.parts:
        res["c"] = part_c()
    res["load_average_end"] = os.getloadavg()[0]
    prev.write_text(json.dumps(res, indent=1))
    if all(k in res for k in ("a", "b", "b_stats", "c")):
        (OUT / "security.md").write_text(markdown(res))
        scatter(res)
    print(json.dumps(res.get("b_stats", {}), indent=1))


if __name__ == "__main__":
    main()

"""Segmentation and residual architectures: layer-wise COPA vs Inverting Gradients on bundled photos.

    python benchmarks/bench_modern.py            # 4 photos, float32
    python benchmarks/bench_modern.py --quick    # 2 photos, shorter IG
    python benchmarks/bench_modern.py --models resnet8 --photos 2 --reuse   # one model; others from their saved rows

Models (jaxinv.zoo.modern_names(), PyTorch-default init, key 10): ``fcn_seg`` (FCN with a 2x2 score map, bilinear
upsampling, 21 classes: determined head), ``unet_seg`` (one skip connection: one block stage) and ``resnet8``
(three residual blocks, each one block stage solved jointly, then global average pooling before the head). Segmentation masks: ``data.segmentation_masks`` (4 luminance
levels of each photo, all present). Labels/masks known to every attack. Per model and photo: COPA where it applies
(its wall time and its total solver iterations), IG (cosine + TV, Adam, one restart) with as many steps as COPA's
solver iterations ("equal evaluations": each IG step is one gradient of the gradient distance, at least one
forward/backward of the whole network; each COPA iteration one matrix-free product of a single layer, so this
budget favours IG), and IG with ``--ig-steps``. PSNR: images in [0, 1], data range 1; 300 dB cap.
Each model's rows are saved as soon as it is done (benchmarks/out/modern_rows/<model>.json; ``--reuse`` takes them
instead of re-running that model). Writes benchmarks/out/modern.json and modern.md for all models.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def main(argv=None):
    import jaxinv
    import jaxinv.metrics
    from jaxinv import data, zoo

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ig-steps", type=int, default=1000)
    ap.add_argument("--models", nargs="*", default=None, help="zoo names to run (default: all)")
    ap.add_argument("--photos", type=int, default=None, help="number of bundled photos (default 4, --quick 2)")
    ap.add_argument("--reuse", action="store_true", help="take saved rows of models not in --models")
    args = ap.parse_args(argv)
    n = args.photos or (2 if args.quick else 4)
    ig_steps = 300 if args.quick else args.ig_steps
    names = data.photo_names()[:n]
    x = jnp.stack([data.load_photo(p, size=32) for p in names])
    rows = []
    saved = os.path.join(OUT, "modern_rows")
    os.makedirs(saved, exist_ok=True)
    run = args.models or zoo.modern_names()
    for name in zoo.modern_names():
        path = os.path.join(saved, f"{name}.json")
        if name not in run:
            if args.reuse and os.path.exists(path):
                with open(path) as f:
                    rows += json.load(f)
            continue
        first = len(rows)
        spec = zoo.info(name)
        module, variables = zoo.build(name, key=jax.random.key(10))
        model = jaxinv.from_linen(module, variables, input_shape=spec.input_shape, name=name,
                                  strict=spec.layerwise)
        seg = spec.task == "segmentation"
        labels = data.segmentation_masks(x, classes=4, num_classes=spec.num_classes) if seg else \
            jnp.arange(n, dtype=jnp.int32) % spec.num_classes
        sec = None
        if spec.layerwise:
            t0 = time.perf_counter()
            rep = jaxinv.security(model, key=jax.random.key(1), probes=2)
            sec = dict(score=rep.score, copa_index=rep.copa_index, seconds=time.perf_counter() - t0,
                       deficiencies=[l.deficiency for l in rep.layers], verdict=rep.verdict,
                       layers=[dict(path=l.path, kind=l.kind, unknowns=l.unknowns, rank=l.rank, exact=l.exact,
                                    lost_energy=l.lost_energy) for l in rep.layers])
        for i, photo in enumerate(names):
            g = jaxinv.client_gradient(model, x[i:i + 1], labels[i:i + 1])
            row = dict(model=name, photo=photo, task=spec.task)
            budget = None
            if spec.layerwise:
                t0 = time.perf_counter()
                rec = jaxinv.copa(model, g, label=labels[i])
                jax.block_until_ready(rec.image)
                budget = int(sum(int(r.steps) for r in rec.layers))
                row.update(copa_psnr=min(300.0, float(jaxinv.metrics.psnr(rec.image, x[i:i + 1])[0])),
                           copa_seconds=time.perf_counter() - t0, copa_iterations=budget,
                           copa_layers=[dict(path=r.path, forward_residual=float(r.forward_residual),
                                             gradient_residual=float(r.gradient_residual), status=int(r.status))
                                        for r in rec.layers])
            for tag, steps in (("ig_equal", budget), ("ig", ig_steps)):
                if steps is None:
                    continue
                t0 = time.perf_counter()
                r = jaxinv.attack("ig", model, g, label=labels[i:i + 1] if seg else labels[i], key=jax.random.key(0),
                                  max_steps=max(int(steps), 8), restarts=1)
                jax.block_until_ready(r.image)
                row[f"{tag}_psnr"] = float(jaxinv.metrics.psnr(jnp.clip(r.image, 0, 1), x[i:i + 1])[0])
                row[f"{tag}_seconds"] = time.perf_counter() - t0
                row[f"{tag}_steps"] = int(steps)
            print(row, flush=True)
            rows.append(row)
        if sec is not None:
            rows.append(dict(model=name, kind="security", **sec))
            print(rows[-1], flush=True)
        with open(path, "w") as f:
            json.dump(rows[first:], f, indent=1)
    with open(os.path.join(OUT, "modern.json"), "w") as f:
        json.dump(dict(rows=rows, ig_steps=ig_steps, jax=jax.__version__), f, indent=1)
    lines = ["# Modern architectures: COPA vs Inverting Gradients (float32, bundled photos, labels/masks known)", "",
             "IG: cosine + TV, Adam, 1 restart; PSNR in dB (data range 1, cap 300), mean over the photos listed.", "",
             "| model | task | photos | COPA PSNR | COPA s | COPA iterations | IG, equal iterations | IG "
             f"{ig_steps} steps | IG s | metric score |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == name and "photo" in r]
        sec = next((r for r in rows if r["model"] == name and r.get("kind") == "security"), None)

        def m(k):
            v = [r[k] for r in rs if k in r]
            return f"{np.mean(v):.1f}" if v else "n/a"
        photos = ", ".join(r["photo"] for r in rs)
        lines.append(f"| {name} | {rs[0]['task']} | {photos} | {m('copa_psnr')} | {m('copa_seconds')} | "
                     f"{m('copa_iterations')} | "
                     f"{m('ig_equal_psnr')} | {m('ig_psnr')} | {m('ig_seconds')} | "
                     f"{'%.0f' % sec['score'] if sec else 'n/a (not layer-wise readable)'} |")
    with open(os.path.join(OUT, "modern.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Command line: ``jaxinv demo | zoo | score | attack`` (also ``python -m jaxinv``).

Exit codes: 0 success, 1 the model failed a ``--fail-under`` bar, 2 bad input (one clear line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _images_grid(rows, scale: int = 4):
    """Stack rows of images (each (N, H, W, C) in [0, 1]) into one uint8 picture, upscaled for viewing."""
    import numpy as np

    pad = 2
    tiles = []
    for row in rows:
        row = np.clip(np.asarray(row, np.float64), 0, 1)
        if row.shape[-1] == 1:
            row = np.repeat(row, 3, axis=-1)
        row = np.repeat(np.repeat(row, scale, axis=1), scale, axis=2)
        n, h, w, _ = row.shape
        line = np.ones((h, n * (w + pad) - pad, 3))
        for i in range(n):
            line[:, i * (w + pad):i * (w + pad) + w] = row[i]
        tiles.append(line)
    width = max(t.shape[1] for t in tiles)
    out = np.ones((sum(t.shape[0] + pad for t in tiles) - pad, width, 3))
    y = 0
    for t in tiles:
        out[y:y + t.shape[0], :t.shape[1]] = t
        y += t.shape[0] + pad
    return (out * 255).round().astype(np.uint8)


def demo(argv=None) -> int:
    """Run COPA on bundled real photos against a few zoo models: a table and a PNG grid."""
    ap = argparse.ArgumentParser(prog="jaxinv demo", description=demo.__doc__)
    ap.add_argument("--models", default="cnn2_c1,cnn6_head10,cnn3_c1,cnn4_c1",
                    help="comma-separated zoo names (see `jaxinv zoo`)")
    ap.add_argument("--n", type=int, default=4, help="number of bundled photos")
    ap.add_argument("--out", default="jaxinv-demo", help="output folder for the PNG grid and results.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--x64", action="store_true", help="float64 (default float32)")
    args = ap.parse_args(argv)

    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from skimage import io

    import jaxinv
    from jaxinv import data, metrics, zoo

    names = [s for s in args.models.split(",") if s]
    unknown = [s for s in names if s not in zoo.names()]
    if unknown:
        print(f"jaxinv demo: unknown model(s) {unknown}; available: {', '.join(zoo.names())}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    key = jax.random.PRNGKey(args.seed)
    photos = data.sample_images(args.n, size=32, key=key)
    print(f"jaxinv {jaxinv.__version__} on {jax.default_backend()} — COPA on {args.n} bundled photos "
          f"({'float64' if args.x64 else 'float32'}); PSNR in dB on [0, 1] images (data range 1)\n")
    header = f"{'model':<13} {'layers (input first): d = determined, D = deficient':<52} {'PSNR':>6} {'SSIM':>6} {'sec':>6}"
    print(header)
    print("-" * len(header))
    results, rows = [], [photos]
    for name in names:
        module, variables = zoo.build(name, key=jax.random.PRNGKey(10))
        shape = zoo.input_shape(name)
        model = jaxinv.from_linen(module, variables, input_shape=shape, name=name)
        dtype = jnp.float64 if args.x64 else jnp.float32
        if args.x64:
            model = jaxinv.from_linen(module, jax.tree_util.tree_map(lambda a: a.astype(dtype), variables),
                                      input_shape=shape, name=name)
        x = photos.astype(dtype)
        if shape[-1] == 1:
            x = x.mean(-1, keepdims=True)
        x = jax.image.resize(x, (x.shape[0],) + shape, "linear")
        labels = jax.random.randint(jax.random.fold_in(key, 1), (args.n,), 0, jaxinv.num_labels(model))
        grads = jax.vmap(lambda xi, yi: jaxinv.client_gradient(model, xi[None], yi[None]))(x, labels)
        t0 = time.perf_counter()
        rec = jaxinv.copa(model, grads, label=labels)
        jax.block_until_ready(rec.image)
        secs = time.perf_counter() - t0  # all images, compilation included
        p = metrics.psnr(rec.image, x)
        s = metrics.ssim(rec.image, x)
        try:
            rep = jaxinv.security(model, key=jax.random.PRNGKey(0))
            pattern = " ".join("d" if l.deficiency == 0 else f"D{l.deficiency}" for l in rep.layers)
        except AttributeError:  # metric not available: count rows against unknowns
            pattern = " ".join("d" if r.forward_rows + r.gradient_rows >= r.unknowns else "D" for r in rec.layers)
        print(f"{name:<13} {pattern:<52} {float(jnp.mean(p)):>6.1f} {float(jnp.mean(s)):>6.3f} {secs:>6.1f}")
        results.append({"model": name, "psnr": np.asarray(p).tolist(), "ssim": np.asarray(s).tolist(),
                        "seconds_incl_compile": secs, "layers": pattern,
                        "label_recovered": np.asarray(rec.label).tolist()})
        img = rec.image if shape[-1] == 3 else jnp.repeat(rec.image, 3, -1)
        rows.append(jax.image.resize(img, photos.shape, "nearest"))
    grid = os.path.join(args.out, "demo_grid.png")
    io.imsave(grid, _images_grid(rows), check_contrast=False)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nrow 1: the photos; rows 2-{len(rows)}: reconstructions by model ({', '.join(names)})")
    print(f"wrote {grid} and {os.path.join(args.out, 'results.json')}")
    return 0


def zoo_cmd(argv=None) -> int:
    """List the model zoo with each model's layers."""
    ap = argparse.ArgumentParser(prog="jaxinv zoo", description=zoo_cmd.__doc__)
    ap.add_argument("name", nargs="?", help="show one model's layers")
    args = ap.parse_args(argv)
    import jax

    import jaxinv
    from jaxinv import zoo

    names = [args.name] if args.name else zoo.names()
    for n in names:
        if n not in zoo.names():
            print(f"jaxinv zoo: unknown model {n!r}; available: {', '.join(zoo.names())}", file=sys.stderr)
            return 2
        module, variables = zoo.build(n, key=jax.random.PRNGKey(0))
        model = jaxinv.from_linen(module, variables, input_shape=zoo.input_shape(n), name=n)
        print(f"{n}:")
        for layer in model.layers():
            print("   ", layer.describe())
    return 0


COMMANDS = {"demo": demo, "zoo": zoo_cmd}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = dict(COMMANDS)
    try:
        from ._security import score_main

        commands["score"] = score_main
    except ImportError:  # pragma: no cover
        pass
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        msg = "usage: jaxinv {" + ",".join(commands) + "} [options]   (jaxinv COMMAND --help for each)"
        if argv and argv[0] not in ("-h", "--help"):
            print(f"jaxinv: unknown command {argv[0]!r}. {msg}", file=sys.stderr)
            return 2
        print(msg)
        return 0
    return int(commands[argv[0]](argv[1:]) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Command line: ``jaxinv demo | zoo | score | audit | attack | sweep`` (also ``python -m jaxinv``).

* ``jaxinv audit MODEL --images DIR|bundled|tfds:NAME[:SPLIT] --n 8 --attacks copa,hybrid,ig --out report/``:
  the security analysis plus real attacks on real images (:func:`jaxinv.audit`); writes ``report.html`` (one
  self-contained file), ``metrics.json`` and PNG grids. ``--json`` prints the metrics JSON to stdout.
* ``jaxinv attack NAME MODEL --images ... --n 4 --out attack/``: one attack; a PNG grid and a JSON.
* ``jaxinv sweep MODEL,MODEL --attacks copa,hybrid --n 8 --out sweep.jsonl [--backend ray]``: every model x image
  x attack, one JSONL row per run, resumable (:func:`jaxinv.sweep`).
* ``jaxinv score MODEL``: the security report alone; ``jaxinv demo``; ``jaxinv zoo``.

``MODEL`` is a zoo name or ``package.module:factory``: an importable callable, called with
``key=jax.random.key(seed)`` if it has a ``key`` parameter, returning a :class:`jaxinv.Model`, ``(linen module,
variables)`` (then ``--input-shape`` is required) or ``(linen module, variables, input_shape)``; the model takes
NHWC images in ``[0, 1]`` (``jaxinv audit --help`` states the factory contract).

Progress goes to stderr, only when stderr is a terminal and ``CI`` is not set.

Exit codes: 0 success; 1 a gate failed (``score --fail-under/--fail-over`` on the predicted score, ``audit`` /
``attack --fail-over DB`` on the measured mean PSNR); 2 bad input (one clear line on stderr naming the argument).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import data, metrics, zoo
from ._audit import audit, jsonable, load_target, merged_options, param_dtype, ray_module, run_attack
from ._audit import step_options, sweep
from ._gradient import num_labels, stacked_gradients
from ._model import Model, from_linen
from ._security import security
from ._version import __version__
from .attacks import ATTACKS
from .engine import copa
from .report import slug, write_grid


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

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    names = [s for s in args.models.split(",") if s]
    unknown = [s for s in names if s not in zoo.names()]
    if unknown:
        print(f"jaxinv demo: unknown model(s) {unknown}; available: {', '.join(zoo.names())}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    key = jax.random.PRNGKey(args.seed)
    photos = data.sample_images(args.n, size=32, key=key)
    print(f"jaxinv {__version__} on {jax.default_backend()} — COPA on {args.n} bundled photos "
          f"({'float64' if args.x64 else 'float32'}); PSNR in dB on [0, 1] images (data range 1)\n")
    header = f"{'model':<13} {'layers (input first): d = determined, D = deficient':<52} {'PSNR':>6} {'SSIM':>6} {'sec':>6}"
    print(header)
    print("-" * len(header))
    results, rows = [], [photos]
    for name in names:
        module, variables = zoo.build(name, key=jax.random.PRNGKey(10))
        shape = zoo.input_shape(name)
        model = from_linen(module, variables, input_shape=shape, name=name)
        dtype = jnp.float64 if args.x64 else jnp.float32
        if args.x64:
            model = from_linen(module, jax.tree_util.tree_map(lambda a: a.astype(dtype), variables),
                               input_shape=shape, name=name)
        x = photos.astype(dtype)
        if shape[-1] == 1:
            x = x.mean(-1, keepdims=True)
        x = jax.image.resize(x, (x.shape[0],) + shape, "linear")
        labels = jax.random.randint(jax.random.fold_in(key, 1), (args.n,), 0, num_labels(model))
        grads = stacked_gradients(model, x, labels)
        t0 = time.perf_counter()
        rec = copa(model, grads, label=labels)
        jax.block_until_ready(rec.image)
        secs = time.perf_counter() - t0  # all images, compilation included
        p = metrics.psnr(rec.image, x)
        s = metrics.ssim(rec.image, x)
        try:
            rep = security(model, key=jax.random.PRNGKey(0))
            pattern = " ".join("d" if l.deficiency == 0 else f"D{l.deficiency}" for l in rep.layers)
        except AttributeError:  # metric not available: count rows against unknowns
            pattern = " ".join("d" if r.forward_rows + r.gradient_rows >= r.unknowns else "D" for r in rec.layers)
        print(f"{name:<13} {pattern:<52} {float(jnp.mean(p)):>6.1f} {float(jnp.mean(s)):>6.3f} {secs:>6.1f}")
        results.append({"model": name, "psnr": np.asarray(p).tolist(), "ssim": np.asarray(s).tolist(),
                        "seconds_incl_compile": secs, "layers": pattern,
                        "label_recovered": np.asarray(rec.label).tolist()})
        img = rec.image if shape[-1] == 3 else jnp.repeat(rec.image, 3, -1)
        rows.append(jax.image.resize(img, photos.shape, "nearest"))
    grid = write_grid(os.path.join(args.out, "demo_grid.png"), rows)
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
    names = [args.name] if args.name else zoo.names()
    for n in names:
        if n not in zoo.names():
            print(f"jaxinv zoo: unknown model {n!r}; available: {', '.join(zoo.names())}", file=sys.stderr)
            return 2
        module, variables = zoo.build(n, key=jax.random.PRNGKey(0))
        model = from_linen(module, variables, input_shape=zoo.input_shape(n), name=n)
        print(f"{n}:")
        for layer in model.layers():
            print("   ", layer.describe())
    return 0


# ============================================================================== audit / attack
_MODEL_HELP = """MODEL is a zoo name (`jaxinv zoo`; PyTorch-default init from --seed) or package.module:factory, an importable
callable (the current directory is on the path) called with key=jax.random.key(seed) if it has a `key` parameter,
returning a jaxinv.Model (from_linen / from_nnx / from_fn, built with input_shape), (linen module, variables) (then
--input-shape is required) or (linen module, variables, input_shape). The model takes NHWC images in [0, 1]
(normalise inside the model)."""
_IMAGES_HELP = ("bundled (photos shipped with scikit-image, default), a folder of .png/.jpg images, or tfds:NAME[:SPLIT] "
                "(needs `pip install 'jaxinv[tfds]'`; its labels are used when the model has enough classes)")
_EXIT_HELP = "exit status: 0 ok; 1 a --fail-over gate failed; 2 bad input (one line on stderr)."


class _BadInput(Exception):
    """A usage error: the command prints it as one line and exits with 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: ...``) and exit code 2."""

    def error(self, message):  # noqa: D102
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


class Progress:
    """A one-line progress display on stderr, off when stderr is not a terminal or ``CI`` is set."""

    def __init__(self, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = (getattr(self.stream, "isatty", lambda: False)()
                       and os.environ.get("CI", "").lower() not in ("true", "1", "yes"))
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, i: int, total: int, stage: str) -> None:
        if not self.enabled:
            return
        end = "\n" if i >= total else ""
        label = f"{i}/{total} {stage}" if i >= total else f"{i + 1}/{total} {stage} ..."
        self.stream.write(f"\r\033[K[{time.perf_counter() - self.t0:7.1f} s] {label}{end}")
        self.stream.flush()


def _shape_arg(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise _BadInput(f"--input-shape must be comma-separated positive integers such as 32,32,3, got {text!r}")
    return shape


def _option_value(text: str):
    try:
        v = json.loads(text)
    except ValueError:
        return text
    return tuple(v) if isinstance(v, list) else v


def _options_arg(items: list[str], attacks: tuple[str, ...], qualified: bool) -> dict:
    """``ATTACK.KEY=VALUE`` (audit) or ``KEY=VALUE`` (attack) items -> ``{attack: {key: value}}``."""
    out: dict = {}
    form = "ATTACK.KEY=VALUE" if qualified else "KEY=VALUE"
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise _BadInput(f"--option must be {form} (e.g. {'ig.' if qualified else ''}max_steps=200), got {item!r}")
        if qualified:
            att, dot, name = name.partition(".")
            if not dot or not name or att not in attacks:
                raise _BadInput(f"--option {item!r}: must be {form} with ATTACK one of --attacks {','.join(attacks)}")
        else:
            att = attacks[0]
        out.setdefault(att, {})[name] = _option_value(value)
    return out



def _attack_options(args, attacks: tuple[str, ...], qualified: bool) -> dict:
    """``--steps`` and ``--option`` -> ``{attack: {key: value}}``, checked by the registry over the audit's
    defaults (a usage error names the option)."""
    options = _options_arg(args.option, attacks, qualified)
    if args.steps is not None:
        if args.steps < 1:
            raise _BadInput(f"--steps must be a positive integer, got {args.steps}")
        steps = step_options(attacks, args.steps)
        options = {a: {**steps.get(a, {}), **options.get(a, {})} for a in attacks if a in steps or a in options}
    try:
        merged_options(attacks, options)
    except TypeError as e:
        raise _BadInput(f"--option: {e}") from None
    return options


def _common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model", metavar="MODEL", help="zoo name or package.module:factory (see above)")
    ap.add_argument("--images", default="bundled", help=_IMAGES_HELP)
    ap.add_argument("--n", type=int, default=8, help="number of images (default 8: the 8 distinct bundled photos)")
    ap.add_argument("--input-shape", default=None, help="one input without the batch axis, e.g. 32,32,3 "
                                                       "(default: the model's)")
    ap.add_argument("--seed", type=int, default=0, help="PRNG seed: zoo init, images, labels, attacks (default 0)")
    ap.add_argument("--steps", type=int, default=None,
                    help="iteration budget of the optimisation attacks: max_steps of dlg/idlg/ig, "
                         "(N, N/2, N/10) for hybrid (default: the audit budgets: ig 1000, dlg/idlg 300, "
                         "hybrid (500, 250, 100))")
    ap.add_argument("--json", action="store_true", help="print the metrics JSON to stdout (instead of the table)")
    ap.add_argument("--x64", action="store_true", help="float64 parameters and images (default float32)")
    ap.add_argument("--device", choices=("cpu", "gpu", "tpu"), default=None,
                    help="run on this JAX platform (default: JAX's default device)")
    ap.add_argument("--fail-over", type=float, default=None, metavar="DB",
                    help="exit 1 if an attack's mean PSNR exceeds DB (a privacy gate on the measured leakage)")




def _command_parser(prog: str, description: str, example: str, *, attack_name: bool = False) -> _Parser:
    """The parser of ``audit`` / ``attack``: their description, the MODEL contract, an example and the exit codes,
    with the arguments they share (:func:`_common_args`), after the attack's NAME when ``attack_name``."""
    ap = _Parser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                 description=description + "\n\n" + _MODEL_HELP, epilog=f"example: {example}\n" + _EXIT_HELP)
    if attack_name:
        ap.add_argument("name", metavar="NAME", help="the attack (jaxinv.ATTACKS: copa, rgap, dlg, idlg, ig, hybrid)")
    _common_args(ap)
    return ap


def _prepare(args, cmd: str):
    """Validate the shared arguments, load the model and the images: (model, shape, images, labels, source, device)."""
    if args.n < 1:
        raise _BadInput(f"--n must be a positive integer, got {args.n}")
    shape = _shape_arg(args.input_shape)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    device = None
    if args.device:
        try:
            device = jax.devices(args.device)[0]
        except RuntimeError as e:
            raise _BadInput(f"--device {args.device}: not available ({str(e).splitlines()[0]})") from None

    def ctx():
        return jax.default_device(device) if device is not None else contextlib.nullcontext()

    with ctx():
        model, shape = _load_model(args.model, shape, args.seed, args.x64)
        images, labels, source = _load_images(args.images, args.n, shape, args.seed)
    if labels is not None and int(labels.max()) >= num_labels(model, shape):
        print(f"{cmd}: note: the dataset's labels reach {int(labels.max())} but MODEL has "
              f"{num_labels(model, shape)} classes: using random labels", file=sys.stderr)
        labels = None
    return model, shape, images, labels, source, ctx


def _load_model(target: str, shape, seed: int, x64: bool):
    try:
        model, shape = load_target(target, shape, seed)
    except ValueError as e:  # includes UnsupportedModelError
        raise _BadInput(f"MODEL: {e}") from None
    if x64:
        params = jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, model.params)
        model = Model(model.apply_fn, params, name=model.name, input_shape=shape, strict=model.strict)
    return model, tuple(shape)


def _load_images(spec: str, n: int, shape: tuple[int, ...], seed: int):
    """``--images`` -> (images ``(n, *shape)`` in [0, 1], labels or None, source description)."""
    if len(shape) != 3 or shape[-1] not in (1, 3):
        raise _BadInput(f"--images: MODEL must take images (H, W, C) with C = 1 or 3; its input shape is {shape}")
    H, W, C = shape
    size = max(H, W)
    labels = None
    try:
        if spec == "bundled":
            x = data.sample_images(n, size=size, key=jax.random.key(seed))
            source = "bundled photos (scikit-image)"
        elif spec.startswith("tfds:"):
            name, _, split = spec[len("tfds:"):].partition(":")
            if not name:
                raise _BadInput(f"--images {spec!r}: give a dataset, e.g. tfds:cifar10 or tfds:cifar10:test")
            x, labels = data.load_tfds(name, split=split or "train", n=n, size=size)
            source = f"tfds {name} ({split or 'train'})"
        else:
            x = data.load_folder(spec, size=size, n=n)
            source = f"folder {os.path.basename(os.path.normpath(spec)) or spec}"
    except (FileNotFoundError, NotADirectoryError, ValueError, ImportError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _BadInput(f"--images {spec!r}: {msg}") from None
    return data.fit_images(x, shape), labels, source


def _command(prog: str) -> Callable[[Callable[[list[str] | None], int]], Callable[..., int]]:
    """Decorator of a command's body: usage errors become one line on stderr (``prog: error: ...``) and exit 2."""

    def wrap(body):
        @functools.wraps(body)
        def command(argv: list[str] | None = None) -> int:
            try:
                return body(argv)
            except SystemExit as e:  # argparse: --help (0) or a usage error (2, already printed)
                return int(e.code or 0)
            except _BadInput as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 2

        return command

    return wrap


def _gate(value: float, limit: float | None, what: str) -> int:
    if limit is not None and value == value and value > limit:
        print(f"FAIL: {what} {value:.2f} dB is above --fail-over {limit:g} dB", file=sys.stderr)
        return 1
    return 0


@_command("jaxinv audit")
def audit_cmd(argv=None) -> int:
    """Audit a model: security report plus real attacks on real images; writes a self-contained HTML report."""
    ap = _command_parser(
        "jaxinv audit",
        "Audit a model against gradient inversion: the layer-wise security analysis (ranks, indices, verdict, "
        "advice) and real attacks on each image's single-image gradient, scored against the truth. Writes "
        "OUT/report.html (self-contained), OUT/metrics.json and PNG grids.",
        "jaxinv audit cnn3_c1 --images bundled --n 4 --attacks copa,ig --steps 300 --out report/")
    ap.add_argument("--attacks", default="copa,hybrid,ig",
                    help="comma-separated attacks (jaxinv.ATTACKS: copa, rgap, dlg, idlg, ig, hybrid)")
    ap.add_argument("--option", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                    help="an attack option, VALUE as JSON or text, e.g. ig.tv_weight=1e-4 (repeatable)")
    ap.add_argument("--out", default="report", help="output folder (default: report)")
    args = ap.parse_args(argv)

    attacks = tuple(dict.fromkeys(a.strip() for a in args.attacks.split(",") if a.strip()))
    bad = [a for a in attacks if a not in ATTACKS]
    if bad or not attacks:
        what = f"unknown attack {bad[0]!r}" if bad else "no attack given"
        raise _BadInput(f"--attacks: {what}; the registered attacks are: {', '.join(ATTACKS)}")
    options = _attack_options(args, attacks, qualified=True)
    model, shape, images, labels, source, ctx = _prepare(args, "jaxinv audit")
    with ctx():
        try:
            res = audit(model, images, labels=labels, attacks=attacks, key=jax.random.key(args.seed),
                        attack_options=options, input_shape=shape, progress=Progress(), source=source)
        except (ValueError, TypeError) as e:  # option types, labels: say which
            raise _BadInput(str(e).splitlines()[0]) from None
    paths = res.save(args.out)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
        print(f"wrote {paths['html']} and {paths['json']}", file=sys.stderr)
    else:
        print(res.table())
        print(f"\nwrote {paths['html']}, {paths['json']} and PNG grids in {args.out}")
    return _gate(res.best_psnr, args.fail_over, "best attack mean PSNR")


@_command("jaxinv attack")
def attack_cmd(argv=None) -> int:
    """Run one attack on real images' single-image gradients; writes a PNG grid and a JSON."""
    ap = _command_parser(
        "jaxinv attack",
        "Run one gradient-inversion attack on the single-image gradients of real images and score it against "
        "them. Writes OUT/attack_NAME.png (true images on top, reconstructions below) and OUT/attack_NAME.json.",
        "jaxinv attack copa cnn2_c1 --n 4 --out attack/", attack_name=True)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="an attack option, VALUE as JSON or text, e.g. tv_weight=1e-4 (repeatable)")
    ap.add_argument("--out", default="attack", help="output folder (default: attack)")
    args = ap.parse_args(argv)

    if args.name not in ATTACKS:
        raise _BadInput(f"NAME: unknown attack {args.name!r}; the registered attacks are: {', '.join(ATTACKS)}")
    options = merged_options((args.name,), _attack_options(args, (args.name,), qualified=False))[args.name]
    model, shape, images, labels, source, ctx = _prepare(args, "jaxinv attack")
    progress = Progress()
    key = jax.random.key(args.seed)
    with ctx():
        dtype = param_dtype(model)
        x = images.astype(dtype)
        if labels is None:
            labels = jax.random.randint(jax.random.fold_in(key, 1), (x.shape[0],), 0, num_labels(model, shape))
        labels = jnp.asarray(labels, jnp.int32)
        progress(0, 2, f"gradients of {x.shape[0]} image(s)")
        grads = stacked_gradients(model, x, labels)
        progress(1, 2, f"attack {args.name}")
        try:
            res = run_attack(model, grads, x, labels, args.name, key=jax.random.fold_in(key, 2), options=options,
                             input_shape=shape)
        except (ValueError, TypeError) as e:
            raise _BadInput(str(e).splitlines()[0]) from None
        progress(2, 2, "done")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"attack_{slug(args.name)}")
    if res.images is not None:
        write_grid(stem + ".png", [np.asarray(x, np.float32), res.images])
    out = jsonable({"jaxinv_version": __version__, "model": model.name, "input_shape": list(shape),
                    "dtype": str(dtype), "source": source, "n_images": int(x.shape[0]),
                    "true_labels": np.asarray(labels), **res.to_dict()})
    with open(stem + ".json", "w") as f:
        json.dump(out, f, indent=1)
    if args.json:
        print(json.dumps(out, indent=1))
    elif res.ok:
        print(f"{args.name} on {model.name} ({x.shape[0]} image(s) from {source}): PSNR {res.mean_psnr:.2f} dB, "
              f"SSIM {res.mean_ssim:.3f}, labels "
              f"{'given' if res.labels_given else format(res.label_accuracy, '.0%')}, {res.seconds:.1f} s")
        print(f"wrote {stem}.png and {stem}.json")
    if not res.ok:
        print(f"jaxinv attack: {args.name} could not run on {model.name}: {res.error}", file=sys.stderr)
        return 2
    return _gate(res.mean_psnr, args.fail_over, f"{args.name} mean PSNR")


@_command("jaxinv sweep")
def sweep_cmd(argv=None) -> int:
    """Run models x images x attacks, one JSONL row per run (resumable), locally or on a Ray cluster."""
    ap = _Parser(prog="jaxinv sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
                 description="Run every model x image x attack (jaxinv.sweep): one JSONL row per run and one security "
                             "row per model, appended as tasks finish; run it again to finish an interrupted sweep.")
    ap.add_argument("models", metavar="MODELS", help="comma-separated zoo names or package.module:factory")
    ap.add_argument("--images", default="bundled", help=_IMAGES_HELP)
    ap.add_argument("--n", type=int, default=8, help="number of images (default 8)")
    ap.add_argument("--size", type=int, default=32, help="side the images of a folder or tfds are loaded at, before "
                                                         "they are fitted to each model (default 32)")
    ap.add_argument("--attacks", default="copa", help="comma-separated attacks (default copa)")
    ap.add_argument("--steps", type=int, default=None, help="iteration budget of the optimisation attacks")
    ap.add_argument("--chunk", type=int, default=8, help="images per task (default 8)")
    ap.add_argument("--no-security", action="store_true", help="skip the per-model security rows")
    ap.add_argument("--backend", choices=("local", "ray"), default="local")
    ap.add_argument("--address", default=None, help="Ray cluster address for --backend ray (default: start a local "
                                                    "one, or RAY_ADDRESS)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="sweep.jsonl", help="JSONL file (default sweep.jsonl)")
    args = ap.parse_args(argv)

    if args.n < 1:
        raise _BadInput(f"--n must be a positive integer, got {args.n}")
    models = [m for m in args.models.split(",") if m]
    attacks = tuple(a for a in args.attacks.split(",") if a)
    if args.images == "bundled":
        images = args.n
    else:
        images = _load_images(args.images, args.n, (args.size, args.size, 3), args.seed)[0]
    if args.backend == "ray":
        try:
            ray_module(args.address, connect=True)
        except ImportError:
            raise _BadInput("--backend ray needs Ray: pip install 'jaxinv[ray]'") from None
    opts = step_options(attacks, args.steps) if args.steps else None
    tty = sys.stderr.isatty() and not os.environ.get("CI")

    def progress(i, n, t):
        if tty:
            print(f"\r{i}/{n} {t['model']} {t['attack'] or 'security'} {t['defence']}", end="", file=sys.stderr)

    try:
        rows = sweep(models, images, out=args.out, key=jax.random.key(args.seed), attacks=attacks,
                     attack_options=opts, security=not args.no_security, chunk=args.chunk,
                     backend=args.backend, progress=progress)
    except (ValueError, TypeError) as e:
        raise _BadInput(str(e).splitlines()[0]) from None
    if tty:
        print(file=sys.stderr)
    runs = [r for r in rows if r["kind"] == "attack"]
    print(f"{len(rows)} rows in {args.out}")
    for m in models:
        for a in attacks:
            p = [r["psnr"] if r["psnr"] is not None else (300.0 if r.get("exact") else float("nan"))
                 for r in runs if r["model"] == m and r["attack"] == a and r["error"] is None]
            print(f"{m:<24} {a:<8} mean PSNR {sum(p) / len(p):7.2f} dB over {len(p)} image(s)" if p else
                  f"{m:<24} {a:<8} no successful run")
    return 0
def score_cmd(argv: list[str] | None = None) -> int:
    """``python -m jaxinv score TARGET [--input-shape 32,32,3] [--fail-under X] [--fail-over X]``.

    ``TARGET`` is a zoo name (``jaxinv.zoo.names()``, built with PyTorch-default init from ``--seed``) or
    ``package.module:factory``, an importable function returning ``(linen module, variables)`` (or a
    :class:`jaxinv.Model`); it is called with ``key=jax.random.key(seed)`` if it takes a ``key`` argument.
    Prints the per-layer table, indices, score, verdict and advice. Exit status: 0; 1 when the gated metric
    (``--metric``: ``score`` = predicted attack PSNR in dB, ``copa`` or ``rgap`` index) is below ``--fail-under``
    or above ``--fail-over`` (a privacy gate: e.g. ``--fail-over 15`` fails models expected to leak recognisable
    images); 2 for a usage or model error.
    """
    ap = argparse.ArgumentParser(prog="python -m jaxinv score",
                                 description="Security of an architecture against layer-wise gradient inversion.")
    ap.add_argument("target", help="zoo name or package.module:factory returning (linen module, variables)")
    ap.add_argument("--input-shape", default=None, help="one input without the batch axis, e.g. 32,32,3")
    ap.add_argument("--seed", type=int, default=0, help="PRNG seed (model init for zoo names, analysis key)")
    ap.add_argument("--metric", choices=("score", "copa", "rgap"), default="score",
                    help="metric the gates apply to (default: score, the predicted attack PSNR in dB)")
    ap.add_argument("--fail-under", type=float, default=None, help="exit 1 if the metric is below this")
    ap.add_argument("--fail-over", type=float, default=None, help="exit 1 if the metric is above this")
    ap.add_argument("--json", default=None, help="also write the report as JSON to this path")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        shape = tuple(int(v) for v in args.input_shape.split(",")) if args.input_shape else None
    except ValueError:
        print(f"error: --input-shape must be comma-separated integers, got {args.input_shape!r}", file=sys.stderr)
        return 2
    try:
        model, shape = load_target(args.target, shape, args.seed)
        rep = security(model, input_shape=shape, key=jax.random.key(args.seed))
    except (ValueError, TypeError) as e:  # includes UnsupportedModelError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(rep.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep.to_dict(), f, indent=1)
    value = {"score": rep.score, "copa": rep.copa_index, "rgap": rep.rgap_index}[args.metric]
    if args.fail_under is not None and value < args.fail_under:
        print(f"FAIL: {args.metric} {value:.4g} is below {args.fail_under:g}", file=sys.stderr)
        return 1
    if args.fail_over is not None and value > args.fail_over:
        print(f"FAIL: {args.metric} {value:.4g} is above {args.fail_over:g}", file=sys.stderr)
        return 1
    return 0


COMMANDS = {"demo": demo, "zoo": zoo_cmd, "audit": audit_cmd, "attack": attack_cmd, "sweep": sweep_cmd,
            "score": score_cmd}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.getcwd() not in sys.path and "" not in sys.path:  # MODEL factories import from the working directory,
        sys.path.insert(0, os.getcwd())  # as under `python -m jaxinv` (the console script does not add it)
    commands = dict(COMMANDS)
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

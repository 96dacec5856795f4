"""Sweeps: models x images x attacks x defences, one JSONL row per run, resumable, local or on a Ray cluster.

A *run* is one (model, defence, attack, image): the client's single-image gradient of the image, transformed by the
defence, inverted by the attack and scored against the image. Runs are grouped into *tasks* (one model, defence and
attack on a chunk of images, solved as stacked targets in one call, see :func:`jaxinv.audit`); each finished task
appends its rows to the JSONL file and flushes it, so an interrupted sweep loses at most the tasks in flight, and
calling :func:`sweep` again with the same arguments runs only what is missing (``resume=True``).

Backends: ``"local"`` runs the tasks one after another in this process on JAX's default devices (stacked targets
are vmapped there; shard them yourself with :func:`jaxinv.shard_targets` for a multi-device host). ``"ray"`` sends
every task to a Ray cluster (the extra ``jaxinv[ray]``): each task is a Ray task with ``num_cpus`` (and
``num_gpus``) resources; a worker keeps the models it has built, so compiled solvers are reused across its tasks.
The driver writes the rows as tasks finish, so the file is the same whichever backend ran it (row order aside).

Rows (JSON objects, one per line):

* ``kind: "attack"``: ``model, defence, attack, options, image`` (index into the sweep's images), ``label`` (true),
  ``label_recovered``, ``psnr`` (``null`` with ``exact: true`` for a bit-exact reconstruction), ``ssim``,
  ``gradient_distance``, ``seconds`` (the task's wall time shared over its images), ``task_seconds``, ``error``
  (why the attack could not run, else ``null``), ``host``, ``backend``, ``jaxinv``.
* ``kind: "security"``, one per model and defence: the :func:`jaxinv.security` score (under that defence),
  verdict, COPA and R-GAP indices and the leaking layer (``error`` if the analysis does not apply).

A row's identity is ``(kind, model, defence, attack, options, image)``: resuming with other options runs again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float, Int, PRNGKeyArray

from .. import data
from .._checks import check_key, merge_options, no_more_keywords, positive_int
from .._client import Client
from .._gradient import check_labels, num_labels
from .._model import Model
from .._security import security as security_report
from .._version import __version__
from ._audit import check_attacks, check_client, check_client_fits, check_images, client_keywords, error_text
from .._fedavg import shared_gradients
from ._audit import merged_options, run_attack
from ._result import jsonable, leaking_layer
from ._targets import load_target

#: A defence: a function ``(grads, key) -> grads`` on one client's gradient pytree (one target).
Defence = Callable[[Any, Any], Any]

BACKENDS = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class Execution:
    """Where and how a sweep's tasks run (validated at construction).

    Attributes:
        backend: ``"local"`` (this process, its default devices) or ``"ray"`` (the Ray cluster ``ray.init``
            connected to; a local one is started if none is).
        chunk: images per task (stacked targets of one call).
        resources: Ray resources per task (default ``{"num_cpus": 1}``), e.g. ``{"num_gpus": 1}``.
        resume: skip runs already in the output file; ``False`` starts the file afresh.

    Example:
        >>> Execution(backend="ray", chunk=4).chunk
        4
    """

    backend: str = "local"
    chunk: int = 8
    resources: Mapping[str, float] | None = None
    resume: bool = True

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        positive_int(self.chunk, "chunk")
        if self.resources is not None and not (
                isinstance(self.resources, Mapping) and all(isinstance(k, str) for k in self.resources)):
            raise TypeError(f"resources must be a dict of Ray resources such as {{'num_gpus': 1}}, got "
                            f"{self.resources!r}")


def ray_module(address: str | None = None, *, connect: bool = False) -> Any:
    """Ray (the extra ``jaxinv[ray]``); with ``connect``, ``ray.init(address)`` unless Ray is initialised already.

    Raises:
        ImportError: Ray is not installed (``pip install 'jaxinv[ray]'``).
    """
    try:
        import ray  # optional dependency (jaxinv[ray]): imported only when a sweep runs on Ray
    except ImportError:
        raise ImportError("backend='ray' needs Ray: pip install 'jaxinv[ray]'") from None
    if connect and not ray.is_initialized():
        ray.init(address=address)
    return ray


# ============================================================================================== tasks
@dataclasses.dataclass(frozen=True)
class _Task:
    """One unit of work: a model's security analysis, or one attack under one defence on a chunk of images."""

    kind: str  # "attack" | "security"
    model_name: str
    model: Any  # a Model, or a zoo name / package.module:factory string built where the task runs
    defence_name: str
    defence: Defence | None
    attack: str
    options: dict
    options_text: str
    indices: tuple[int, ...]
    images: np.ndarray | None  # the chunk at the model's input shape in [0, 1]; rows past len(indices) are padding
    labels: np.ndarray | None
    key: np.ndarray  # raw key data (uint32), picklable
    input_shape: tuple[int, ...]
    client: Client

    def row_keys(self) -> list[tuple]:
        if self.kind == "security":
            return [("security", self.model_name, self.defence_name, "", self.options_text, -1)]
        return [("attack", self.model_name, self.defence_name, self.attack, self.options_text, i) for i in self.indices]


def _row_key(row: dict) -> tuple:
    return (row.get("kind"), row.get("model"), row.get("defence"), row.get("attack", ""), row.get("options_text", ""),
            row.get("image", -1))


_WORKER_MODELS: dict[str, Model] = {}  # per process: models built or received once, compiled solvers kept on them


def _resolve(name: str, m: Any) -> Model:
    """The model of a task: given, or built once per process from its zoo name / factory string."""
    if isinstance(m, Model):
        return _WORKER_MODELS.setdefault(f"{name}:{id(m)}", m)
    token = f"{m}:"
    if token not in _WORKER_MODELS:
        _WORKER_MODELS[token] = load_target(m)[0]
    return _WORKER_MODELS[token]


def _meta(backend: str) -> dict:
    meta = {"host": socket.gethostname(), "backend": backend, "device": jax.default_backend(), "jaxinv": __version__}
    if backend == "ray":
        meta["node"] = ray_module().get_runtime_context().get_node_id()
    return meta


def run_task(task: _Task, backend: str = "local") -> list[dict]:
    """Run one task and return its rows (never raises for a model or attack that cannot run: ``error`` says why)."""
    meta = _meta(backend)
    base = {"model": task.model_name, "defence": task.defence_name}
    key = jax.random.wrap_key_data(jnp.asarray(task.key))
    t0 = time.perf_counter()
    try:
        model = _resolve(task.model_name, task.model)
    except ValueError as e:
        err = error_text(e)
        keys = task.row_keys()
        return [dict(kind=k[0], **base, attack=k[3], options_text=k[4], image=k[5], error=err, **meta) for k in keys]
    if task.kind == "security":
        row = dict(kind="security", **base, attack="", options_text=task.options_text, image=-1)
        try:
            rep = security_report(model, input_shape=task.input_shape, key=key, defence=task.defence,
                                  **client_keywords(task.client))
        except ValueError as e:
            return [dict(row, error=error_text(e), seconds=time.perf_counter() - t0, **meta)]
        leak = leaking_layer(rep)
        return [jsonable(dict(row, error=None, score=rep.score, verdict=rep.verdict, copa_index=rep.copa_index,
                              rgap_index=rep.rgap_index, leaking_layer=leak.path,
                              deficiencies={l.path: l.deficiency for l in rep.layers},
                              seconds=time.perf_counter() - t0, **meta))]
    k_def, k_att = jax.random.split(key)
    x = jnp.asarray(task.images)
    y = jnp.asarray(task.labels)
    grads = shared_gradients(model, x, y, task.client)
    if task.defence is not None:
        keys = jax.random.split(k_def, x.shape[0])
        grads = jax.vmap(task.defence)(grads, keys)
    res = run_attack(model, grads, x, y, task.attack, key=k_att, options=task.options, input_shape=task.input_shape)
    n = len(task.indices)
    rows = []
    for j, i in enumerate(task.indices):
        p = float(res.psnr[j])
        rows.append(jsonable(dict(
            kind="attack", **base, attack=task.attack, options=task.options, options_text=task.options_text, image=i,
            label=int(task.labels[j]), label_recovered=None if res.labels is None else int(res.labels[j]),
            labels_given=res.labels_given, psnr=p, exact=bool(np.isposinf(p)), ssim=float(res.ssim[j]),
            gradient_distance=float(res.gradient_distance[j]), seconds=res.seconds / n, task_seconds=res.seconds,
            error=res.error, **meta)))
    return rows


# ============================================================================================== the sweep
def _models(models: Any) -> dict[str, Any]:
    if isinstance(models, (Model, str)):
        models = [models]
    if isinstance(models, Mapping):
        items = list(models.items())
    else:
        try:
            items = [(m.name if isinstance(m, Model) else m, m) for m in models]
        except TypeError:
            raise TypeError("models must be a jaxinv.Model, a zoo name / package.module:factory string, a sequence of "
                            f"those, or a dict {{name: model}}; got {type(models).__name__}") from None
    out: dict[str, Any] = {}
    for name, m in items:
        if not isinstance(m, (Model, str)):
            raise TypeError(f"models[{name!r}] must be a jaxinv.Model or a zoo name / package.module:factory string, "
                            f"got {type(m).__name__}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"model names must be non-empty strings, got {name!r}")
        if name in out:
            raise ValueError(f"two models are named {name!r}: pass a dict {{name: model}} with distinct names")
        out[name] = m
    if not out:
        raise ValueError("models is empty")
    return out


def _defences(defences: Any) -> dict[str, Defence | None]:
    if defences is None:
        return {"none": None}
    if not isinstance(defences, (Mapping, str)):
        try:
            defences = {("none" if d is None else getattr(d, "name", None) or repr(d)): d for d in defences}
        except TypeError:
            pass
    if not isinstance(defences, Mapping):
        raise TypeError("defences must be a dict {name: defence or None}, a defence being a function "
                        "(grads, key) -> grads on one client's gradient, e.g. {'none': None, 'noise': fn}")
    for name, d in defences.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"defence names must be non-empty strings, got {name!r}")
        if d is not None and not callable(d):
            raise TypeError(f"defences[{name!r}] must be a function (grads, key) -> grads or None, got "
                            f"{type(d).__name__}")
    if not defences:
        raise ValueError("defences is empty: pass None for no defence, or {'none': None, ...}")
    return dict(defences)


def _images(images: Any) -> tuple[jax.Array | None, int]:
    """``(photos or None, N)``: the given square images, or ``None`` and a number of bundled photos."""
    if isinstance(images, (int, np.integer)) and not isinstance(images, bool):
        if int(images) < 1:
            raise ValueError(f"images must be a positive number of bundled photos or an array, got {images}")
        return None, int(images)
    photos = jnp.asarray(images)
    if photos.ndim != 4:
        raise ValueError(f"images must have shape (N, s, s, C) or be a number of photos, got shape "
                         f"{tuple(photos.shape)}")
    return photos, photos.shape[0]


def _read_done(path: str) -> dict[tuple, dict]:
    """Rows already in the file, by identity; a torn last line (an interrupted write) is cut off."""
    done: dict[tuple, dict] = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        blob = f.read()
    good = 0
    for line in blob.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        done[_row_key(row)] = row
        good += len(line)
    if good != len(blob):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def sweep(
    models: Any,
    images: Float[ArrayLike, "N H W C"] | int,
    *,
    out: str | os.PathLike[str],
    key: PRNGKeyArray,
    attacks: Sequence[str] = ("copa",),
    defences: Mapping[str, Defence | None] | None = None,
    labels: Int[ArrayLike, " N"] | None = None,
    attack_options: dict[str, dict[str, Any]] | None = None,
    client: Client | None = None,
    security: bool = True,
    execution: Execution | None = None,
    progress: Callable[[int, int, dict], Any] | None = None,
    **kwargs: Any,
) -> list[dict]:
    """Run every (model, defence, attack, image) and write one JSONL row per run; resumable.

    Args:
        models: a dict ``{name: model}`` or a sequence of models, a model being a :class:`jaxinv.Model` or a string
            :func:`jaxinv.zoo` name / ``package.module:factory`` (built where the task runs, cheap to send to Ray).
        images: ``(N, s, s, C)`` square images in ``[0, 1]``, resized to each model's input
            (:func:`jaxinv.data.fit_images`), or an int ``N``: that many bundled photos (:func:`jaxinv.data.sample_images`).
        out: the JSONL file (created, or appended to).
        key: JAX PRNG key: labels (when not given), the defences' noise and the attacks' random starts, derived per
            model, defence, attack and chunk from names, so adding a model does not change the others' rows.
        attacks: names from :data:`jaxinv.ATTACKS`; ``attack_options``: ``{attack: {option: value}}`` over
            the audit's budgets (``AUDIT_DEFAULTS``).
        defences: ``{name: defence}`` or a sequence of :mod:`jaxinv.defences` (named by their ``.name``), a defence
            being ``(grads, key) -> grads`` on one client's gradient (vmapped over the images), ``None`` for no
            defence; default ``{"none": None}``.
        labels: ``(N,)`` labels for every model (default: random per model from ``key``).
        client: the client's setting (:class:`jaxinv.Client`, as in :func:`jaxinv.audit`; ``batch_size`` must stay
            ``None``); a client other than the default is part of every row's identity.
        security: also write one ``kind: "security"`` row per model and defence (:func:`jaxinv.security` with
            ``defence=``: the predicted PSNR under it).
        execution: where and how the tasks run (:class:`Execution`: ``backend``, ``chunk``, ``resources``,
            ``resume``); its fields are also accepted as keywords (``backend="ray"``, ``chunk=4``, ...).
        progress: called as ``progress(done, total, task_description)`` after each task.

    Returns:
        The rows of this sweep's runs (those found in ``out`` and the new ones), in grid order.

    Raises:
        TypeError, ValueError: bad models, defences, attacks, options, client, images, labels or execution (before
            any run); ImportError: ``backend="ray"`` without Ray installed (``pip install 'jaxinv[ray]'``).

    Example:
        >>> rows = jaxinv.sweep({"tiny": model}, images[:2], attacks=("copa",), out="sweep.jsonl",
        ...                     key=jax.random.key(0))
        >>> [(r["kind"], r["attack"], r["image"]) for r in rows]  # model "tiny", defence "none"
        [('security', '', -1), ('attack', 'copa', 0), ('attack', 'copa', 1)]
        >>> all(r["psnr"] > 60 and r["label"] == r["label_recovered"] for r in rows[1:])
        True

        The rows are also in ``sweep.jsonl``; with pandas, ``pd.read_json("sweep.jsonl", lines=True)
        .groupby(["model", "defence", "attack"]).psnr.mean()`` tabulates a grid.
    """
    run = merge_options(execution, Execution, kwargs, "sweep")
    no_more_keywords(kwargs, "sweep", "its own and the fields of jaxinv.Execution (backend, chunk, resources, resume)")
    if run.backend == "ray":
        ray_module()  # Ray missing: an ImportError before anything runs
    key = check_key(key, "sweep", required=True)
    client = check_client(client, "sweep")
    mods = _models(models)
    defs = _defences(defences)
    names = check_attacks(attacks)
    opts = merged_options(names, attack_options, client)
    opt_text = {n: json.dumps(jsonable(opts[n]), sort_keys=True) for n in names}
    sec_text = json.dumps(jsonable(client_keywords(client)), sort_keys=True) if client_keywords(client) else ""
    base_images, n_img = _images(images)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != n_img:
            raise ValueError(f"labels must have one entry per image ({n_img}), got {labels.shape[0]}")

    path = os.fspath(out)
    if not run.resume and os.path.exists(path):
        os.remove(path)
    done = _read_done(path)

    def seed(*parts: str) -> np.ndarray:
        k = key
        for p in parts:
            k = jax.random.fold_in(k, zlib.crc32(p.encode()) & 0x7FFFFFFF)
        return np.asarray(jax.random.key_data(k))

    chunk = run.chunk
    tasks: list[_Task] = []
    order: list[tuple] = []
    for mname, m in mods.items():
        try:
            built = _resolve(mname, m)
            shape = built.resolve_input_shape(None)
            K = num_labels(built, shape)
            check_client_fits(built, shape, client)
        except ValueError as e:
            raise ValueError(f"models[{mname!r}]: {str(e).splitlines()[0]}") from None
        mkey = seed("model", mname)
        if security:  # one report per defence: the score predicts the layer-wise attack under it
            for dname, d in defs.items():
                t = _Task("security", mname, m, dname, d, "", {}, sec_text, (), None, None, mkey, shape, client)
                order += t.row_keys()
                if any(k not in done for k in t.row_keys()):
                    tasks.append(t)
        x = None  # built lazily: only when some run of this model is missing
        for dname, d in defs.items():
            for a in names:
                for s in range(0, n_img, chunk):
                    idx = tuple(range(s, min(s + chunk, n_img)))
                    keys = [("attack", mname, dname, a, opt_text[a], i) for i in idx]
                    order += keys
                    if all(k in done for k in keys):
                        continue
                    if x is None:
                        photos = (data.sample_images(n_img, size=max(shape[:2]), key=jax.random.fold_in(key, 0))
                                  if base_images is None else base_images)
                        try:
                            x = np.asarray(check_images(data.fit_images(photos, shape), shape, name="images"))
                        except ValueError as e:
                            raise ValueError(f"model {mname!r}: {e}") from None
                        if labels is None:
                            y = np.asarray(jax.random.randint(jax.random.wrap_key_data(jnp.asarray(mkey)), (n_img,),
                                                              0, K))
                        else:
                            y = np.asarray(check_labels(jnp.asarray(labels), K, name="labels"))
                    tkey = seed("run", mname, dname, a, str(s))
                    # the last chunk is padded with repeats of its last image (rows dropped): one compile per
                    # model and attack
                    take = np.minimum(np.arange(s, s + min(chunk, n_img)), n_img - 1)
                    tasks.append(_Task("attack", mname, m, dname, d, a, opts[a], opt_text[a], idx, x[take], y[take],
                                       tkey, shape, client))

    with open(path, "a") as f:
        def write(rows: list[dict], task: _Task, i: int):
            for r in rows:
                f.write(json.dumps(r) + "\n")
                done[_row_key(r)] = r
            f.flush()
            os.fsync(f.fileno())
            if progress is not None:
                progress(i, len(tasks), {"kind": task.kind, "model": task.model_name, "defence": task.defence_name,
                                         "attack": task.attack, "images": list(task.indices)})

        if run.backend == "local":
            for i, t in enumerate(tasks):
                write(run_task(t, "local"), t, i + 1)
        else:
            _run_ray(tasks, write, run.resources or {"num_cpus": 1})
    return [done[k] for k in order if k in done]


def _run_ray(tasks: list[_Task], write, resources: Mapping[str, float]) -> None:
    ray = ray_module(connect=True)
    remote = ray.remote(**resources)(run_task)
    pending = {remote.remote(t, "ray"): t for t in tasks}
    finished = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            t = pending.pop(ref)
            finished += 1
            write(ray.get(ref), t, finished)

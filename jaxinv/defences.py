r"""Defences: transformations of a client's shared gradient, composable like optax's, applied before an attack.

A defence is a pure function of one client's gradient pytree and a PRNG key, :math:`\tilde g = D(g; k)`, wrapped in
:class:`Defence` (a name and its parameters for reports). It works under ``jax.jit`` and ``jax.vmap`` (stacked
targets: vmap it over the gradients and a split key), and plugs into :func:`jaxinv.sweep` (``defences={...}``).

* :func:`gaussian`, :func:`laplacian`: additive noise :math:`\tilde g = g + \sigma \xi` on every entry (``relative``:
  :math:`\sigma` times the gradient's RMS entry, a noise-to-signal ratio comparable across models).
* :func:`clip`: :math:`\tilde g = g \min(1, C / \|g\|_2)` over the whole pytree.
* :func:`dp_sgd`: DP-SGD's per-example step for one example, clip to :math:`C` then add
  :math:`\mathcal N(0, (zC)^2)` (Abadi et al. 2016); the privacy it buys is :func:`dp_epsilon`.
* :func:`prune`: gradient pruning (Zhu et al. 2019): per tensor, the ``rate`` fraction of smallest-magnitude entries
  set to zero.
* :func:`quantize`: uniform ``bits``-bit quantisation per tensor on :math:`[-\max|g|, \max|g|]` (round to nearest,
  or stochastic rounding with the key); :func:`sign`: signSGD, :math:`\operatorname{sign}(g)` scaled by the tensor's
  mean magnitude.
* :func:`cast`: a round trip through a low-precision float (``float16``, ``bfloat16``).
* :func:`chain`: apply several in order, each with its own key.

Example:
    >>> d = jaxinv.defences.chain(jaxinv.defences.prune(0.9), jaxinv.defences.gaussian(1e-3))
    >>> noisy = d(grads, jax.random.key(0))
    >>> rec = jaxinv.copa(model, noisy)
    >>> float(jaxinv.metrics.psnr(rec.image, x)[0]) < 30   # without the defence COPA's answer is exact here
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray, PyTree

from ._checks import positive_int

__all__ = ["Defence", "cast", "chain", "clip", "dp_epsilon", "dp_sgd", "gaussian", "identity", "laplacian", "prune",
           "quantize", "sign"]


@dataclasses.dataclass(frozen=True, eq=False)
class Defence:
    """A gradient transformation ``(grads, key) -> grads``; call it like a function.

    Attributes:
        name: short description for reports (``"gaussian(sigma=0.001)"``).
        fn: the transformation; ``params``: its parameters (for JSON reports).
    """

    name: str
    fn: Callable[[PyTree, Any], PyTree] = dataclasses.field(repr=False)
    params: dict = dataclasses.field(default_factory=dict)

    def __call__(self, grads: PyTree, key: PRNGKeyArray | None = None) -> PyTree:
        return self.fn(grads, key)

    def __str__(self) -> str:
        return self.name


def _name(kind: str, **params) -> str:
    return f"{kind}(" + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) + ")"


def _positive(value: Any, what: str, *, zero_ok: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        raise ValueError(f"{what} must be {'>= 0' if zero_ok else '> 0'} and finite, got {value!r}")
    return v


def _need_key(key, who: str):
    if key is None:
        raise ValueError(f"the {who} defence draws random numbers: call it with a PRNG key, d(grads, key)")
    return key


def _leaf_keys(grads, key):
    leaves, tdef = jax.tree_util.tree_flatten(grads)
    return leaves, tdef, jax.random.split(key, max(len(leaves), 1))


def _floating(g) -> bool:
    return jnp.issubdtype(jnp.result_type(g), jnp.floating)


def _rms(grads) -> jax.Array:
    leaves = [g for g in jax.tree_util.tree_leaves(grads) if _floating(g)]
    n = sum(g.size for g in leaves)
    return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves) / max(n, 1))


def identity() -> Defence:
    """No defence (the gradient as shared)."""
    return Defence("none", lambda g, k: g)


def _noise(kind: str, scale: float, relative: bool, draw) -> Defence:
    def fn(grads, key):
        key = _need_key(key, kind)
        s = scale * _rms(grads) if relative else scale
        leaves, tdef, keys = _leaf_keys(grads, key)
        out = [g + (s * draw(k, g.shape)).astype(g.dtype) if _floating(g) else g for g, k in zip(leaves, keys)]
        return jax.tree_util.tree_unflatten(tdef, out)

    return Defence(_name(kind, **({"scale": scale} if kind == "laplacian" else {"sigma": scale}), relative=relative),
                   fn, {"kind": kind, "scale": scale, "relative": relative})


def gaussian(sigma: float, *, relative: bool = False) -> Defence:
    r"""Additive Gaussian noise :math:`\tilde g = g + \sigma\xi`, :math:`\xi \sim \mathcal N(0, I)`.

    Args:
        sigma: the noise's standard deviation (``relative``: in units of the gradient's RMS entry
            :math:`\|g\|_2/\sqrt{n}`, so ``sigma=0.1`` is noise at a tenth of the signal's scale).
    """
    return _noise("gaussian", _positive(sigma, "sigma", zero_ok=True), bool(relative),
                  lambda k, s: jax.random.normal(k, s))


def laplacian(scale: float, *, relative: bool = False) -> Defence:
    r"""Additive Laplacian noise :math:`\tilde g = g + b\,\xi`, :math:`\xi \sim \mathrm{Laplace}(0, 1)` (standard
    deviation :math:`\sqrt2 b`); ``relative`` as in :func:`gaussian`."""
    return _noise("laplacian", _positive(scale, "scale", zero_ok=True), bool(relative),
                  lambda k, s: jax.random.laplace(k, s))


def clip(max_norm: float) -> Defence:
    r"""Global-norm clipping :math:`\tilde g = g\,\min(1, C/\|g\|_2)` over all leaves."""
    C = _positive(max_norm, "max_norm")

    def fn(grads, key):
        del key
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads) if _floating(g)))
        f = jnp.minimum(1.0, C / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
        return jax.tree_util.tree_map(lambda g: (g * f).astype(g.dtype) if _floating(g) else g, grads)

    return Defence(_name("clip", max_norm=C), fn, {"kind": "clip", "max_norm": C})


def dp_sgd(clip_norm: float, noise_multiplier: float) -> Defence:
    r"""DP-SGD for one example's gradient: clip to :math:`C`, add :math:`\mathcal N(0, (zC)^2 I)`.

    For a batch of :math:`B` examples DP-SGD clips each example's gradient, sums them, adds this noise once and
    divides by :math:`B`; for the single-image gradients jaxinv attacks the two agree. :func:`dp_epsilon` gives the
    :math:`(\varepsilon, \delta)` guarantee of ``noise_multiplier`` :math:`z` over a training run.
    """
    C = _positive(clip_norm, "clip_norm")
    z = _positive(noise_multiplier, "noise_multiplier", zero_ok=True)
    c, n = clip(C), gaussian(z * C)
    d = chain(c, n)
    return Defence(_name("dp_sgd", clip_norm=C, noise_multiplier=z), d.fn,
                   {"kind": "dp_sgd", "clip_norm": C, "noise_multiplier": z})


def dp_epsilon(noise_multiplier: float, *, steps: int, sampling_rate: float, delta: float) -> float:
    r"""The :math:`\varepsilon` of DP-SGD's :math:`(\varepsilon, \delta)` guarantee after ``steps`` steps of the
    Poisson-subsampled Gaussian mechanism (sampling rate :math:`q = B/N`, noise multiplier :math:`z`), from the
    Rényi-DP accountant of Google's ``dp_accounting`` library (Mironov 2017; Mironov, Talwar & Zhang 2019).

    Args:
        noise_multiplier: :math:`z` (noise std over the clipping norm), ``> 0``.
        steps: number of training steps; ``sampling_rate``: :math:`q \in (0, 1]`; ``delta``: :math:`\delta \in (0, 1)`.

    Raises:
        ImportError: ``dp_accounting`` is not installed (``pip install 'jaxinv[dp]'``).
        ValueError: arguments out of range.
    """
    z = _positive(noise_multiplier, "noise_multiplier")
    steps = positive_int(steps, "steps", what="accountant steps")
    q = _positive(sampling_rate, "sampling_rate")
    if q > 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    dl = _positive(delta, "delta")
    if dl >= 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError:
        raise ImportError("dp_epsilon needs Google's dp_accounting: pip install 'jaxinv[dp]'") from None
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps))
    return float(acc.get_epsilon(dl))


def prune(rate: float) -> Defence:
    r"""Gradient pruning: in every tensor the ``rate`` fraction of entries of smallest magnitude is set to zero
    (``rate=0.9`` keeps the largest 10%; ties at the threshold are kept)."""
    r = _positive(rate, "rate", zero_ok=True)
    if r >= 1:
        raise ValueError(f"rate must be in [0, 1) (the fraction of entries set to zero), got {rate!r}")

    def one(g):
        if not _floating(g) or g.size == 0:
            return g
        n_zero = int(math.floor(r * g.size))
        if n_zero == 0:
            return g
        a = jnp.abs(g).reshape(-1)
        thr = jnp.sort(a)[n_zero - 1]
        return jnp.where(jnp.abs(g) > thr, g, jnp.zeros_like(g))

    return Defence(_name("prune", rate=r), lambda g, k: jax.tree_util.tree_map(one, g), {"kind": "prune", "rate": r})


def quantize(bits: int, *, stochastic: bool = False) -> Defence:
    r"""Uniform quantisation to :math:`2^{b-1}-1` levels per sign on :math:`[-m, m]`, :math:`m = \max|g|` per tensor:
    :math:`\tilde g = m\,\mathrm{round}(g (2^{b-1}-1)/m) / (2^{b-1}-1)` (``stochastic``: unbiased random rounding,
    needs a key). ``bits >= 2``; one bit is :func:`sign`."""
    bits = positive_int(bits, "bits", minimum=2, what="use jaxinv.defences.sign() for one bit")
    levels = 2 ** (bits - 1) - 1

    def fn(grads, key):
        if stochastic:
            key = _need_key(key, "stochastic quantize")
        leaves, tdef = jax.tree_util.tree_flatten(grads)
        keys = jax.random.split(key, max(len(leaves), 1)) if stochastic else [None] * len(leaves)
        out = []
        for g, k in zip(leaves, keys):
            if not _floating(g):
                out.append(g)
                continue
            m = jnp.max(jnp.abs(g))
            step = jnp.where(m > 0, m / levels, 1.0)
            u = g / step
            q = jnp.floor(u + jax.random.uniform(k, g.shape, u.dtype)) if stochastic else jnp.round(u)
            out.append((q * step).astype(g.dtype))
        return jax.tree_util.tree_unflatten(tdef, out)

    return Defence(_name("quantize", bits=bits, stochastic=bool(stochastic)), fn,
                   {"kind": "quantize", "bits": bits, "stochastic": bool(stochastic)})


def sign() -> Defence:
    r"""signSGD: :math:`\tilde g = \operatorname{sign}(g)\cdot\operatorname{mean}|g|` per tensor (1-bit compression
    with the tensor's scale)."""
    def one(g):
        return (jnp.sign(g) * jnp.mean(jnp.abs(g))).astype(g.dtype) if _floating(g) else g

    return Defence("sign()", lambda g, k: jax.tree_util.tree_map(one, g), {"kind": "sign"})


def cast(dtype: Any) -> Defence:
    """A round trip through a lower-precision float: ``g.astype(dtype).astype(g.dtype)`` (``float16``,
    ``bfloat16``)."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a float dtype such as 'float16' or 'bfloat16', got {dtype!r}") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dt}")

    def one(g):
        return g.astype(dt).astype(g.dtype) if _floating(g) else g

    return Defence(f"cast({dt.name})", lambda g, k: jax.tree_util.tree_map(one, g), {"kind": "cast", "dtype": dt.name})


def chain(*defences: Defence) -> Defence:
    """Apply ``defences`` in order (each gets its own key split from the one given)."""
    for i, d in enumerate(defences):
        if not callable(d):
            raise TypeError(f"chain: argument {i} is a {type(d).__name__}, not a defence")

    def fn(grads, key):
        keys = jax.random.split(key, len(defences)) if key is not None else [None] * len(defences)
        for d, k in zip(defences, keys):
            grads = d(grads, k)
        return grads

    names = [getattr(d, "name", getattr(d, "__name__", "fn")) for d in defences]
    return Defence(" -> ".join(names) or "none", fn,
                   {"kind": "chain", "steps": [getattr(d, "params", {}) for d in defences]})

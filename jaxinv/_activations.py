r"""Element-wise activations: forward, inverse and derivative, and their identification in a traced model.

The backward recursion needs, for the activation :math:`s_l` after layer :math:`l`,

* the inverse :math:`z_l = s_l^{-1}(x_l)` (to turn the reconstructed output into the pre-activation that the forward
  constraint :math:`A_l x_{l-1} = z_l - b_l` needs), and
* the derivative :math:`s_l'(z_l)` (for :math:`\delta_l = (\partial\ell/\partial x_l) \odot s_l'(z_l)`).

A model's activation is found by tracing; it is identified *numerically* here, by comparing the traced
element-wise sub-computation with each known activation on a probe grid. So ``jnp.tanh``, ``nn.tanh`` and a
hand-written ``(e^{2z}-1)/(e^{2z}+1)`` are the same activation, and a user never has to tell us which one it is.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

#: Activations the layer-wise methods can follow, with their parameter (if any).
SUPPORTED = ("identity", "tanh", "sigmoid", "leaky_relu(slope)", "elu(alpha)", "softplus", "relu")


@dataclasses.dataclass(frozen=True)
class Activation:
    """An element-wise activation :math:`x = s(z)`.

    Attributes:
        name: one of ``identity, tanh, sigmoid, leaky_relu, elu, softplus, relu`` (invertible except ``relu``),
            or ``gelu``/``silu`` (identified so that errors can name them; not invertible on all of R).
        param: the slope of ``leaky_relu`` or the ``alpha`` of ``elu``; ``None`` otherwise.
    """

    name: str
    param: float | None = None

    def __str__(self) -> str:
        return self.name if self.param is None else f"{self.name}({self.param:g})"

    # ---------------------------------------------------------------- forward
    def __call__(self, z):
        n, a = self.name, self.param
        if n == "identity":
            return z
        if n == "tanh":
            return jnp.tanh(z)
        if n == "sigmoid":
            return jax.nn.sigmoid(z)
        if n == "leaky_relu":
            return jnp.where(z >= 0, z, a * z)
        if n == "relu":
            return jnp.maximum(z, 0)
        if n == "elu":
            return jnp.where(z > 0, z, a * jnp.expm1(jnp.minimum(z, 0)))
        if n == "softplus":
            return jax.nn.softplus(z)
        if n == "gelu":
            return jax.nn.gelu(z, approximate=bool(a))
        if n == "silu":
            return jax.nn.silu(z)
        raise ValueError(f"unknown activation {n!r}")

    @property
    def kinked(self) -> bool:
        """Whether the derivative jumps (ReLU, leaky ReLU): what :meth:`smoothed` smooths."""
        return self.name in ("relu", "leaky_relu")

    def smoothed(self, z, t=None):
        r"""The activation with its kink smoothed at temperature ``t`` (exact when ``t`` is ``None`` or the
        activation has no kink): :math:`a z + (1 - a)\,t\,\mathrm{softplus}(z / t)` for a leaky ReLU of slope
        :math:`a` (ReLU: :math:`a = 0`), which tends to it as :math:`t \to 0` (continuation for the joint solves).

        Example:
            >>> act = Activation("leaky_relu", 0.2)
            >>> [round(float(v), 4) for v in act.smoothed(jnp.array([-1.0, 0.0, 1.0]), 0.01)]
            [-0.2, 0.0055, 1.0]
        """
        if t is None or not self.kinked:
            return self(z)
        a = self.param if self.name == "leaky_relu" else 0.0
        return a * z + (1 - a) * t * jax.nn.softplus(z / t)

    @property
    def invertible(self) -> bool:
        """Whether :math:`s^{-1}` exists on the activation's image."""
        return self.name in ("identity", "tanh", "sigmoid", "leaky_relu", "elu", "softplus")

    @property
    def image(self) -> tuple[float, float]:
        """The open interval :math:`s(\\mathbb{R})` (for clipping and the pull-back box)."""
        n, a = self.name, self.param
        return {
            "tanh": (-1.0, 1.0),
            "sigmoid": (0.0, 1.0),
            "softplus": (0.0, np.inf),
            "relu": (0.0, np.inf),
            "elu": (-(a or 1.0), np.inf),
        }.get(n, (-np.inf, np.inf))

    # ---------------------------------------------------------------- inverse
    def inverse(self, x):
        r"""Pre-activation from the output: :math:`z = s^{-1}(x)`, clipping values outside the image.

        Returns:
            ``(z, clipped)``: ``clipped`` counts the entries of ``x`` that lay outside the open image of
            :math:`s` (or too close to its boundary for the dtype) and were moved inside before inverting.
            For ``relu`` the returned ``z`` equals ``x`` on the active units (``x > 0``) and is 0 elsewhere:
            there the pre-activation is only known to be ``<= 0``.
        """
        n, a = self.name, self.param
        eps = 8 * jnp.finfo(x.dtype).eps
        if n in ("identity", "relu"):
            return x, jnp.zeros((), jnp.int32)
        if n == "leaky_relu":
            return jnp.where(x >= 0, x, x / a), jnp.zeros((), jnp.int32)
        lo, hi = self.image
        lo_c = lo + eps * max(1.0, abs(lo)) if np.isfinite(lo) else -jnp.inf
        hi_c = hi - eps * max(1.0, abs(hi)) if np.isfinite(hi) else jnp.inf
        if n == "softplus":
            lo_c = jnp.finfo(x.dtype).tiny * 1e6
        clipped = jnp.sum((x < lo_c) | (x > hi_c)).astype(jnp.int32)
        xc = jnp.clip(x, lo_c, hi_c)
        if n == "tanh":
            z = jnp.arctanh(xc)
        elif n == "sigmoid":
            z = jnp.log(xc) - jnp.log1p(-xc)
        elif n == "softplus":
            z = xc + jnp.log(-jnp.expm1(-xc))
        elif n == "elu":
            z = jnp.where(xc > 0, xc, jnp.log1p(jnp.minimum(xc, 0) / a))
        else:
            raise ValueError(
                f"activation {self} is not invertible; the layer-wise attacks support {', '.join(SUPPORTED)}"
            )
        return z, clipped

    # ------------------------------------------------------------- derivative
    def derivative(self, z, x=None):
        r""":math:`s'(z)`. For piecewise-linear activations the sign of ``x`` (if given) decides the branch,
        which is exact where ``z`` is unknown (inactive ReLU units: derivative 0)."""
        n, a = self.name, self.param
        if n == "identity":
            return jnp.ones_like(z)
        if n == "tanh":
            t = jnp.tanh(z) if x is None else x
            return 1 - t * t
        if n == "sigmoid":
            s = jax.nn.sigmoid(z) if x is None else x
            return s * (1 - s)
        if n == "leaky_relu":
            v = z if x is None else x
            return jnp.where(v >= 0, 1.0, a).astype(z.dtype)
        if n == "relu":
            v = z if x is None else x
            return (v > 0).astype(z.dtype)
        if n == "elu":
            return jnp.where(z > 0, 1.0, a * jnp.exp(jnp.minimum(z, 0))).astype(z.dtype)
        if n == "softplus":
            return jax.nn.sigmoid(z)
        return jax.vmap(jax.grad(self.__call__))(z.ravel()).reshape(z.shape)


# ------------------------------------------------------------------ identification
_GRID = np.concatenate([np.linspace(-6.0, 6.0, 481), [-20.0, -10.0, 10.0, 20.0]])
_PROBE_SLOPE_AT = -2.0


def _candidates(f_grid: np.ndarray) -> list[Activation]:
    """Candidate activations, with their parameters fitted from the probe values."""
    g = _GRID
    out = [Activation("identity"), Activation("tanh"), Activation("sigmoid"), Activation("relu"),
           Activation("softplus"), Activation("silu"), Activation("gelu", 0.0), Activation("gelu", 1.0)]
    i = int(np.argmin(np.abs(g - _PROBE_SLOPE_AT)))
    slope = float(f_grid[i] / g[i])
    if np.isfinite(slope) and slope != 0.0:
        out.append(Activation("leaky_relu", round(slope, 6)))
    alpha = float(f_grid[i] / np.expm1(g[i]))
    if np.isfinite(alpha) and alpha > 0:
        out.append(Activation("elu", round(alpha, 6)))
    return out


def identify(fn: Callable, shape: tuple[int, ...], dtype) -> Activation | None:
    """Which known activation the element-wise function ``fn`` (acting on arrays of ``shape``) computes.

    ``fn`` is evaluated on a probe grid laid out over arrays of ``shape`` and on a random array; an activation
    matches when it agrees everywhere (relative tolerance 1e-5), which also certifies that ``fn`` acts the same
    on every element. Returns ``None`` when nothing matches.
    """
    size = int(np.prod(shape))
    reps = -(-len(_GRID) // size)
    probe = np.resize(_GRID, reps * size).reshape((reps,) + tuple(shape)).astype(np.float32)
    with jax.ensure_compile_time_eval():
        vals = np.asarray(jax.vmap(fn)(jnp.asarray(probe, dtype)), np.float64)
    f_grid = vals.reshape(-1)[: len(_GRID)]
    rng = np.random.default_rng(0)
    rand = rng.normal(0, 3, size=shape).astype(np.float32)
    with jax.ensure_compile_time_eval():
        f_rand = np.asarray(fn(jnp.asarray(rand, dtype)), np.float64)
    if not (np.all(np.isfinite(f_grid)) and np.all(np.isfinite(f_rand))):
        return None
    for cand in _candidates(f_grid):
        ref_grid = np.asarray(cand(jnp.asarray(_GRID, jnp.float32)), np.float64)
        ref_rand = np.asarray(cand(jnp.asarray(rand)), np.float64)
        tol = lambda r: 1e-5 * (1.0 + np.abs(r))  # noqa: E731
        if np.all(np.abs(ref_grid - f_grid) <= tol(ref_grid)) and np.all(np.abs(ref_rand - f_rand) <= tol(ref_rand)):
            return cand
    return None

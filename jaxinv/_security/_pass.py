r"""The representative pass: the input, label and natural-image probes the metric analyses the layers at.

Above the model reading and the shared gradient's loss (:mod:`jaxinv._gradient`); below the layer's certificates
(:mod:`._certificates`, which take one :class:`LayerData` per layer) and the defended score (:mod:`._defended`,
which inverts the same :func:`natural_probes`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_key
from .._gradient import loss_fn
from .._maps import layer_pass
from .._model import Model, Stage
from ._layer_maps import cache_of


@dataclasses.dataclass
class LayerData:
    """One layer of the representative pass: its stage, input, pre-activation gradient and row mask."""

    stage: Stage
    x_in: jax.Array  # (1, *in_shape)
    z: jax.Array
    delta: jax.Array
    x_out: jax.Array
    role: str
    probes: np.ndarray  # (P, *in_shape[1:]): this layer's inputs for the natural-image probes
    gain: float  # activation inverse gain at this layer's output (see LayerSecurity.inverse_gain)


def natural_probes(key, input_shape: tuple[int, ...], n: int = 4) -> np.ndarray:
    r"""``n`` synthetic natural-looking images in ``[0, 1]``: Gaussian random fields with a :math:`1/f` amplitude
    spectrum (the second-order statistics of photographs), a shared luminance field plus weaker per-channel colour
    fields, scaled to mean 0.45 and standard deviation 0.22 and clipped. Inputs that are not ``(H, W, C)`` images
    get uniform noise. Used to measure how much of a *typical image's* energy a layer's null space holds."""
    key = check_key(key, "natural_probes", required=True)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).astype(np.uint64).tolist())
    if len(input_shape) != 3:
        return rng.uniform(0, 1, (n,) + tuple(input_shape)).astype(np.float32)
    H, W, C = input_shape
    fy = np.fft.fftfreq(H)[:, None]
    fx = np.fft.fftfreq(W)[None, :]
    amp = 1.0 / np.maximum(np.sqrt(fy**2 + fx**2), 1.0 / max(H, W))
    amp[0, 0] = 0.0

    def field():
        z = rng.standard_normal((H, W)) + 1j * rng.standard_normal((H, W))
        f = np.real(np.fft.ifft2(z * amp))
        return (f - f.mean()) / (f.std() + 1e-12)

    out = np.empty((n, H, W, C), np.float32)
    for i in range(n):
        lum = field()
        for c in range(C):
            img = lum + (0.3 * field() if C > 1 else 0.0)
            img = (img - img.mean()) / (img.std() + 1e-12)
            out[i, :, :, c] = np.clip(0.45 + 0.22 * img, 0.0, 1.0)
    return out


def _inverse_gain(act, z: np.ndarray, x: np.ndarray) -> float:
    r""":math:`\mathrm{rms}(x)\sqrt{\mathrm{mean}(1/s'(z)^2)}/\mathrm{rms}(z)` over the units the inverse uses."""
    d = np.asarray(act.derivative(jnp.asarray(z), jnp.asarray(x)), np.float64)
    use = d > 0 if act.name == "relu" else np.ones_like(d, bool)
    if not np.any(use):
        return 1.0
    d, z, x = d[use], z[use], x[use]
    rz = math.sqrt(float(np.mean(z * z))) or 1.0
    return float(math.sqrt(float(np.mean(x * x))) * math.sqrt(float(np.mean(1.0 / np.maximum(d, 1e-30) ** 2))) / rz)


def representative_pass(model: Model, structure, leaves, x: jax.Array, label: jax.Array, loss: str,
                        probes: np.ndarray) -> list[LayerData]:
    r"""Forward and backward pass at one input (every layer's input, pre-activation and :math:`\delta_l`), and
    forward passes of the probe images (every layer's input, and the activations' inverse gains)."""
    stages = structure.stages
    n_out = math.prod(stages[-1].nodes.x_out.shape)
    lf = loss_fn(loss, n_out)
    cache = cache_of(structure)
    if ("pass", loss) not in cache:
        cache[("pass", loss)] = jax.jit(_make_pass(stages, lf))
    run = cache[("pass", loss)]
    xs, zs, deltas, (pins, pzs) = run(list(leaves), x, label, jnp.asarray(probes, x.dtype))
    last = len(stages) - 1
    out = []
    for i, s in enumerate(stages):
        z = np.asarray(pzs[i], np.float64)
        xo = np.asarray(s.activation(pzs[i]), np.float64)
        gain = _inverse_gain(s.activation, z, xo) if i < last else 1.0
        out.append(LayerData(s, xs[i], zs[i], deltas[i], xs[i + 1], "head" if i == last else "hidden",
                             np.asarray(pins[i]), gain))
    return out


def _make_pass(stages, lf):
    """The pass as one function of ``(leaves, x, label, probes)`` (jitted once per structure and loss)."""

    def run(leaves, x, label, probes):
        xs, zs, deltas = layer_pass(stages, leaves, x, label, lf)

        def probe(p):
            ins, pre, h = [], [], p[None]
            for s in stages:
                ins.append(h[0])
                z = s.affine(h, leaves)
                pre.append(z[0])
                h = s.activation(z)
            return ins, pre

        return xs, zs, deltas, jax.vmap(probe)(probes)

    return run

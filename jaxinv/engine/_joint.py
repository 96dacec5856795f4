r"""The noise-aware joint correction of the bottom layers: where the layer-wise answer does not match its data.

Trained layers are ill-conditioned: the shared gradient's own rounding (relative :math:`2^{-24}` in float32), the
small error every solve passes down, are amplified by :math:`1/\sigma_{\min}` of each layer's system, and the
bottom layers' least-squares answers blow up (a trained CNN6: the image layer's input 15x its norm off, -2 dB)
while every layer above is right to 1e-4. Their residuals say so, without the truth: the least-squares residual
of layer :math:`l`, :math:`r_l = \max(\text{forward}, \text{gradient residual})`, sits far above its **noise
floor**, the residual of the layer above it (the error it inherits) and the gradient dtype's precision:

.. math:: r_l > \max(\tau\, r_{l+1},\ \min(\nu\,\varepsilon_g, 10^{-2})), \qquad \tau = 30,\ \nu = 2 \cdot 10^3,

or grossly, :math:`r_l > 0.1` (a gradient no input produced).

Where that holds for one of the bottom :math:`K` = ``correct_depth`` layers, those stages are
solved **jointly for the image** :math:`u`, from the layer-wise answer :math:`x_K` above them (its pre-activation
:math:`z_{K-1}` and :math:`\delta_{K-1} = \partial\ell/\partial z_{K-1}` through the network above, as the fold
computes them): with :math:`f(u;\theta) = z_{K-1}` the bottom stages,

.. math:: r(u) = \Big[\frac{m\,(f(u) - z_{K-1})}{\|m\,z_{K-1}\|};\ \
    \frac{\nabla_{\theta_k}\langle\delta_{K-1}, f(u;\theta)\rangle - g_{\theta_k}}{\|g_{\theta_k}\|}\ \ (\theta_k
    \text{ the kernels and biases of the } K \text{ stages})\Big]

(:math:`m` a ReLU's active units), minimised by a projected Levenberg-Marquardt (box :math:`\Pi`,
:func:`jaxinv.engine.levenberg_marquardt`) from two starts: the least-squares image projected onto the box, and
the flat image of its mean colour. The unknown the ill-conditioned layer lost is chosen by the layers below it (the
image lives on a 3,072-dimensional set where the 3,468 numbers of a CNN6's second layer input could be anything),
and the projection keeps it an image.

**Underdetermined chains.** Where a stage below the head has fewer rows than unknowns (:func:`deficient_depth`:
a CNN whose strided convolution shrinks 5,400 inputs to 980 outputs), its least-squares answer is the
minimum-norm one and loses what its rows cannot see (70 % of a typical input's energy): the image below it is
then worse than a flat one. The bottom stages up to it are solved jointly for the image instead, on every target,
and the flat image's answer is kept unless the least-squares image's fits clearly better (:data:`NEAREST`): of
the images the data allow, the one nearest the flat image. On a linear system that is the flat image plus the
least-squares correction, whose error :math:`(I - P)(x - \bar x)` is never larger than the flat image's own.
Measured (copa, 4 held-out photos, float32, CNN4-c1 after 300 / 1000 Adam steps; CNN3-c1 after 300): 9.1 -> 20.5,
10.6 -> 16.8, 17.8 -> 23.5 dB; untrained CNN4-c1 11.9 -> 13.0 (its gradient barely sees the mean colour).

**Kinks.** Below a (leaky) ReLU the residual is not even continuous: the gradient rows of the weight under it,
:math:`\sum_j a'(z_j)\,(W^\top\delta)_j\,\mathrm{patch}_j(u)`, jump when a unit crosses its kink (by a factor
100 for a leaky ReLU of slope 0.01). LM linearises with the current pattern, and from 1e-3 off the truth of a
trained LeNet its Gauss-Newton step *raises* the residual (5.9e-3 to 0.28: the units that flipped dominate), so it
stalls (which, near the truth, is what keeps a good least-squares image). So the flat image's start follows a
continuation: LM on the kinks smoothed (:meth:`jaxinv.Activation.smoothed`) at temperatures :data:`SMOOTHING` times
the first pre-activation's RMS, then on the exact residual. Because the exact residual jumps, it is a poor judge
near the truth (an untrained LeNet's 50 dB image can sit at 4e-2 while a 27 dB one sits at 2e-2): the flat image's
answer wins only when its residual is below :data:`ALTERNATIVE` times the least-squares image's. Measured (copa,
4 held-out photos, float32 gradients, ``benchmarks/out/trained/trained_after_cont.md``): a LeNet after 300 Adam
steps 18.1 -> 26.3 dB (22.6 with the correction alone); untrained LeNet and CNN6 within 0.1 dB.

A result is never worse than the flat image of the recovered mean as far as the data can tell: when the best
residual is not below half the flat image's, the flat image is returned with status ``RESULTS.fallback``.
Otherwise the status is ``RESULTS.successful`` when :math:`\|r\| \le 10^{-2}` and ``RESULTS.inconsistent`` above.
The same rule on the whole gradient closes every layer-wise attack (:func:`finish`; ``Solver(fallback=False)``
turns it off): an answer whose gradient is grossly off and not clearly closer than the flat image's falls back to
the flat image.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .._gradient import loss_fn, target_distances
from .._maps import norm, stage_inputs
from .._model import Model, Structure
from .._priors import box_projection, project_box
from .._result import LayerReport
from .._results import RESULTS
from ._block import levenberg_marquardt
from ._layer import unactivate
from ._options import Solver

RATIO = 30.0
"""A layer is inconsistent when its residual exceeds ``RATIO`` times the residual of the layer above."""
FLOOR = 2e3
"""... and ``FLOOR`` times the gradient dtype's epsilon (float32: 2.4e-4), at most :data:`CONSISTENT`. (At 1e3 a
GroupNorm block solved by Levenberg-Marquardt to 92 dB, forward residual 1.1968e-4, was flagged on one machine:
an LM-solved block's residual is bounded by its tolerance, a little above the dtype's epsilon.)"""
GROSS = 0.1
"""A layer whose residual exceeds this is inconsistent whatever the layers above it (a gradient that no input
produced: noise, another model's, a heavy defence)."""
CONSISTENT = 1e-2
"""A corrected image is ``successful`` when its joint relative residual is at most this."""
SMOOTHING = (0.3, 0.1, 0.03, 0.01)
"""Temperatures (x the RMS of the first pre-activation) of the continuation on kinked activations."""
SMOOTH_ITERS = 10
"""Levenberg-Marquardt iterations per smoothing temperature."""
ALTERNATIVE = 0.5
"""The flat image's answer replaces the least-squares image's only when its residual is below ``ALTERNATIVE`` times
the latter's: below a kink the residual jumps where units flip, and near the truth it can exceed a far worse
image's (an untrained LeNet: 50.5 dB at residual 4.4e-2 against 27.2 dB at 2.4e-2)."""
NEAREST = 10.0
"""Below an underdetermined stage the flat image's answer is kept unless its residual exceeds ``NEAREST`` times the
least-squares image's (or the noise floor): of the images the data allow, the one nearest the flat image."""
FALLBACK = 0.5
"""The flat image is returned unless the best answer's residual is below ``FALLBACK`` times the flat image's."""


class Correction(NamedTuple):
    """What :func:`correct_bottom` returns for one image."""

    image: Array
    layer_residuals: tuple[tuple[Array, Array], ...]
    """Per bottom stage (input layer first), its forward and gradient residual at the answer (the forward rows of
    the stages below the top one hold by construction: 0)."""
    residual: Float[Array, ""]
    """The joint relative residual :math:`\\|r(u)\\|` of the answer."""
    start: Int[Array, ""]
    """Which start won: 0 the least-squares image, 1 the flat image's LM (its continuation below a kink), 2 the
    flat image itself (fallback)."""
    steps: Int[Array, ""]
    status: Int[Array, ""]


def layer_residual(rep: LayerReport) -> Array:
    r"""A layer's residual :math:`r_l = \max(\text{forward}, \text{gradient residual})` (no forward rows: the
    gradient one)."""
    return jnp.fmax(jnp.nan_to_num(rep.forward_residual, nan=0.0), rep.gradient_residual)


def inconsistent_layers(residuals: Float[Array, "L ..."], eps: float) -> Array:
    r"""Which layers' least-squares answers sit above their noise floor (module docstring):
    :math:`r_l > \max(\tau r_{l+1}, \nu\varepsilon_g)`, or :math:`r_l >` :data:`GROSS` (the head: only that), for
    ``residuals`` ``(L, ...)`` input layer first. NaN residuals (no forward block) count as 0.

    Example:
        >>> inconsistent_layers(jnp.array([0.4, 1e-3, 4e-5, 1e-7]), 1.2e-7).tolist()
        [True, False, False, False]
    """
    r = jnp.nan_to_num(residuals, nan=0.0)
    above = jnp.concatenate([r[1:], jnp.zeros_like(r[:1])], axis=0)
    flag = (r > jnp.maximum(RATIO * above, min(FLOOR * eps, CONSISTENT))) | (r > GROSS)
    return flag.at[-1].set(r[-1] > GROSS)


def bottom_residual(structure: Structure, leaves: list[Array], gleaves: list[Array], x_top: Array, label: Array,
                    lf, depth: int, smooth=None):
    r"""The joint residual :math:`u \mapsto r(u)` of the bottom ``depth`` stages (module docstring), its data from
    ``x_top`` (the layer-wise input of stage ``depth``, shape ``(1, ...)``) and the label; and
    :math:`u \mapsto` each stage's ``(forward, gradient)`` residual norms. ``smooth``: the temperature at which
    the kinks of the activations between the bottom stages are smoothed (:meth:`jaxinv.Activation.smoothed`;
    ``None``: exact)."""
    stages = structure.stages
    top = stages[depth - 1]

    def upper(x):
        h = x
        for s in stages[depth:]:
            h = s(h, leaves)
        return lf(h, label.reshape((1,) + label.shape))

    z, mask, delta, _ = unactivate(top, x_top, jax.grad(upper)(x_top))
    m = jnp.ones_like(z) if mask is None else mask
    idx = [i for s in stages[:depth] for i in (s.nodes.kernel_leaf, s.nodes.bias_leaf) if i >= 0]
    tiny = jnp.finfo(z.dtype).tiny

    def lower(u, lv):
        h = u
        for s in stages[: depth - 1]:
            h = s.activation.smoothed(s.affine(h, lv), smooth)
        return top.affine(h, lv)

    def parts(u):
        out = [(m * (lower(u, leaves) - z)).reshape(-1) / jnp.maximum(norm(m * z), tiny)]
        g = jax.grad(lambda lv: jnp.sum(lower(u, lv) * delta))(leaves)
        return out + [(g[i] - gleaves[i]).reshape(-1) / jnp.maximum(norm(gleaves[i]), tiny) for i in idx]

    def per_layer(u):
        p = dict(zip(["forward"] + idx, parts(u)))
        zero = jnp.zeros((), z.dtype)
        return tuple((norm(p["forward"]) if k == depth - 1 else zero, norm(p[s.nodes.kernel_leaf]))
                     for k, s in enumerate(stages[:depth]))

    return lambda u: jnp.concatenate(parts(u)), per_layer


def flat_image(x: Array, box) -> Array:
    """The flat image of ``x``'s mean colour (mean over every axis but the last), inside ``box``."""
    project = box_projection(box)
    axes = tuple(range(x.ndim - 1))
    return jnp.broadcast_to(jnp.mean(project(x), axis=axes, keepdims=True), x.shape)


def correct_bottom(structure: Structure, leaves: list[Array], gleaves: list[Array], image: Array, x_top: Array,
                   label: Array, lf, solver: Solver, depth: int | None = None, nearest: bool = False) -> Correction:
    """The joint correction of one image (module docstring): ``image`` ``(1, *input_shape)`` the least-squares
    answer, ``x_top`` the layer-wise input of stage ``depth`` (default ``solver.correct_depth``). ``nearest``:
    the bottom stages are underdetermined (:func:`deficient_depth`), and the flat image's answer, the solution
    nearest the flat image, is kept unless the least-squares image's fits clearly better (:data:`NEAREST`)."""
    depth = solver.correct_depth if depth is None else depth
    resid, per_layer = bottom_residual(structure, leaves, gleaves, x_top, label, lf, depth)
    project = box_projection(solver.box)
    dtype = image.dtype
    tol = 1e-7 if dtype == jnp.float32 else 1e-10

    def lm(r, u0, iters):
        return levenberg_marquardt(r, u0, rtol=tol, atol=tol, max_steps=300, iters=iters, lam0=1e-3,
                                   project=project, factors=(0.3, 4.0))

    kinked = any(s.activation.kinked for s in structure.stages[: depth - 1])

    def continuation(u0):
        """LM on the kinks smoothed at temperatures ``SMOOTHING`` x the RMS of the first pre-activation, then on
        the exact residual (the gradient rows of a weight below a kink jump where a unit crosses it: started off
        the answer's pattern, LM on the exact map stalls at those jumps)."""
        z0 = structure.stages[0].affine(u0, leaves)
        scale = jnp.sqrt(jnp.mean(z0 * z0))
        u, steps = u0, jnp.zeros((), jnp.int32)
        for t in SMOOTHING:
            r, _ = bottom_residual(structure, leaves, gleaves, x_top, label, lf, depth,
                                   smooth=jnp.maximum(t * scale, jnp.finfo(dtype).tiny))
            u, _, more = lm(r, u, SMOOTH_ITERS)
            steps = steps + more
        u, c, more = lm(resid, u, solver.correct_iters)
        return u, c, steps + more

    flat = flat_image(image, solver.box)
    xa, ca, sa = lm(resid, project(image), solver.correct_iters)
    xb, cb, sb = continuation(flat) if kinked else lm(resid, flat, solver.correct_iters)
    ca = jnp.where(jnp.isfinite(ca), ca, jnp.inf)
    cb = jnp.where(jnp.isfinite(cb), cb, jnp.inf)
    other = (cb <= NEAREST * jnp.maximum(ca, min(FLOOR * jnp.finfo(dtype).eps, CONSISTENT))) if nearest else \
        (cb < ALTERNATIVE * ca)
    best_x, best_c, win = jnp.where(other, xb, xa), jnp.where(other, cb, ca), jnp.where(other, 1, 0)
    steps = sa + sb
    cf = norm(resid(flat))
    fall = ~(best_c < FALLBACK * cf)
    x = jnp.where(fall, flat, best_x)
    c = jnp.where(fall, cf, best_c)
    status = jnp.where(fall, int(RESULTS.fallback),
                       jnp.where(c <= CONSISTENT, int(RESULTS.successful), int(RESULTS.inconsistent)))
    return Correction(x, per_layer(x), c, jnp.where(fall, 2, win).astype(jnp.int32),
                      steps.astype(jnp.int32), status.astype(jnp.int32))


def can_correct(structure: Structure, solver: Solver, depth: int | None = None) -> bool:
    """Whether the correction applies: it is on, and the bottom ``depth`` (default ``correct_depth``) stages are
    plain layers below the head (blocks are solved jointly already)."""
    d = solver.correct_depth if depth is None else depth
    st = structure.stages
    return solver.correct and d < len(st) and all(s.nodes.kind == "layer" for s in st[:d])


def deficient_depth(reports: tuple[LayerReport, ...]) -> int:
    """One more than the highest stage below the head whose system has fewer rows than unknowns (forward plus
    gradient rows, counted: an upper bound on its rank), or 0 when every one has enough: the joint solve of the
    bottom stages up to it starts from a determined layer's input.

    Example:
        >>> z = jnp.zeros(())
        >>> r = lambda n, f, g: LayerReport("l", "conv", n, f, g, z, z, z, z, z, z, z)  # unknowns, rows
        >>> deficient_depth((r(3072, 5400, 162), r(5400, 980, 480), r(980, 363, 240), r(363, 4, 1452)))
        3
    """
    low = [k for k, rep in enumerate(reports[:-1]) if rep.forward_rows + rep.gradient_rows < rep.unknowns]
    return max(low) + 1 if low else 0


def gradient_eps(*dtypes) -> float:
    """The precision the data carry: the largest epsilon of the shared gradient's dtype(s) and the attack's
    (``None`` entries are skipped)."""
    return max(float(jnp.finfo(d).eps) for d in dtypes if d is not None)



def apply_correction(structure: Structure, leaves: list[Array], gleaves: list[Array], image: Array, label: Array,
                     reports: tuple[LayerReport, ...], layer_inputs: tuple[Array, ...], lf, solver: Solver,
                     eps: float, stacked: bool, traced: bool):
    """The correction inside an attack: flag the inconsistent layers of every image, mark them
    ``RESULTS.inconsistent``, and (when :func:`can_correct`) correct the images whose bottom layers are flagged.

    ``image`` ``(B, *input_shape)``, ``label`` ``(B,)``, ``reports``/``layer_inputs`` the fold's (stacked over
    ``B`` when ``stacked``). Returns ``(image, reports, layer_inputs)``; untouched when no image needs it (checked
    on the host unless ``traced``)."""
    r = jnp.stack([layer_residual(rep) for rep in reports])
    flags = inconsistent_layers(r, eps)
    reports = tuple(eqx.tree_at(lambda q: q.status, rep,
                                jnp.where(f & (rep.status == int(RESULTS.successful)), int(RESULTS.inconsistent),
                                          rep.status).astype(jnp.int32))
                    for rep, f in zip(reports, flags))
    # an underdetermined chain, unless the pull-back constraints chose its lost directions already
    low = deficient_depth(reports) if reports[0].refine_steps is None else 0
    depth = next((d for d in (max(solver.correct_depth, low), low, solver.correct_depth)
                  if d and can_correct(structure, solver, d)), 0)
    if not depth:
        return image, reports, layer_inputs
    if depth < low:
        low = 0
    need = jnp.any(flags[:depth], axis=0).reshape(-1) | (low > 0)
    if not traced and not bool(jnp.any(need)):
        return image, reports, layer_inputs
    B = image.shape[0]
    g = gleaves if stacked else [a[None] for a in gleaves]

    def one(gl, x, top, y):
        return correct_bottom(structure, leaves, gl, x[None], top[None], y, lf, solver, depth, low > 0)

    c = jax.lax.map(lambda a: one(*a), (g, image, layer_inputs[depth], label.reshape(B)))
    pick = lambda new, old: jnp.where(need.reshape((B,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
    image = pick(c.image.reshape(image.shape), image)
    bottom = jax.vmap(lambda x: stage_inputs(structure.stages[:depth], leaves, x))(image)
    inputs = list(layer_inputs)
    inputs[:depth] = [pick(a.reshape(b.shape), b) for a, b in zip(bottom, layer_inputs)]
    shape = lambda a: a.reshape(reports[0].status.shape)  # noqa: E731
    new_reports = list(reports)
    for k in range(depth):
        rep = reports[k]
        fres, gres = c.layer_residuals[k]
        keep = lambda new, old: shape(jnp.where(need, new, old.reshape(-1)))  # noqa: E731
        extra = c.steps if k == 0 else 0
        new_reports[k] = eqx.tree_at(
            lambda q: (q.forward_residual, q.gradient_residual, q.status, q.steps), rep,
            (keep(fres, rep.forward_residual), keep(gres, rep.gradient_residual),
             keep(c.status, rep.status).astype(jnp.int32), shape(rep.steps.reshape(-1) + jnp.where(need, extra, 0))))
    return image, tuple(new_reports), tuple(inputs)


def distance_status(reports: tuple[LayerReport, ...], distance: Array, fell: Array | None = None
                    ) -> tuple[LayerReport, ...]:
    """The truth-free final check: the image layer's status becomes ``RESULTS.inconsistent`` (unless already
    failed) where the reconstruction's own gradient is farther than :data:`GROSS` from the shared one
    (:attr:`jaxinv.Reconstruction.gradient_distance`, one per target), and ``RESULTS.fallback`` where ``fell``
    (one per target: the image was replaced by the flat one, :func:`finish`)."""
    rep = reports[0]
    shape = rep.status.shape
    bad = (distance.reshape(shape) > GROSS) & (rep.status == int(RESULTS.successful))
    status = jnp.where(bad, int(RESULTS.inconsistent), rep.status)
    if fell is not None:
        status = jnp.where(fell.reshape(shape), int(RESULTS.fallback), status)
    return (eqx.tree_at(lambda q: q.status, rep, status.astype(jnp.int32)),) + tuple(reports[1:])


def finish(model: Model, structure: Structure, gleaves: list[Array], image: Array, labels: Array,
           reports: tuple[LayerReport, ...], layer_inputs: tuple[Array, ...], loss: str, solver: Solver, eps: float,
           stacked: bool, traced: bool):
    r"""The last stage of a layer-wise attack (:func:`jaxinv.copa`, the hybrid), after the fold: the joint
    correction (:func:`apply_correction`), the projection onto ``solver.box``, the truth-free gradient distance
    :math:`d(\hat x) = \|g(\hat x) - g\| / \|g\|` of every target, and the **gross fallback**: where

    .. math:: d(\hat x) > \text{GROSS}, \qquad d(\hat x) \ge \text{FALLBACK}\cdot d(\bar x), \qquad
        r_L \le \text{CONSISTENT}

    (:math:`\bar x` the flat image of :math:`\hat x`'s mean colour, :math:`r_L` the head's residual), the shared
    gradient tells the answer from a flat image no better than by a factor 2 while matching neither, although the
    gradient itself is consistent (the head's rows fit it: a defence's noise would show there first, and under
    noise a noisy answer can still beat the flat image: cnn2_c1 under relative Gaussian noise 0.3, 30.2 dB
    against 19.7). The answer's detail is then the attack's amplified error, not the data's, and the flat image
    (of smaller expected error) is returned with status ``RESULTS.fallback`` (a FedAvg update read to first order
    with :math:`K\eta = 0.1`: 12 dB -> the flat image's 19). ``Solver(fallback=False)``: the answer as it is;
    ``solver.correct`` off: neither the correction nor the fallback, the raw least-squares answer. Measured
    (``benchmarks/bench_trained.py``, copa and copa+pb, 4 held-out photos, float32): every answer whose distance
    exceeded :data:`GROSS` (17 of 240: LeNet-DLG after 1000 Adam steps, CNN4-c1 after 300 and 1000, a ReLU CNN)
    was below the flat image of the true mean; LeNet-DLG 1000: 8.5-12.6 dB, the flat image of the recovered mean
    13.2-25.8 (the true mean's 13.3-27.8).

    ``image`` ``(B, *input_shape)``, ``labels`` ``(B, ...)``; ``reports``/``layer_inputs`` the fold's (stacked over
    ``B`` when ``stacked``). Returns ``(image, reports, layer_inputs, distance)``.
    """
    n_out = math.prod(structure.stages[-1].nodes.x_out.shape)
    image, reports, inputs = apply_correction(
        structure, jax.tree_util.tree_leaves(model.params), gleaves, image, labels, reports, layer_inputs,
        loss_fn(loss, n_out), solver, eps, stacked, traced)
    image = project_box(image, solver.box)  # the input lies in the box: the projection only moves toward it
    dist = target_distances(model, image, labels, gleaves, loss, n_out, stacked)
    if not (solver.correct and solver.fallback):  # the answer as it is (the raw least-squares one without correct)
        return image, distance_status(reports, dist), (image,) + tuple(inputs[1:]), dist
    flat = jax.vmap(lambda x: flat_image(x[None], solver.box)[0])(image)
    flat_dist = target_distances(model, flat, labels, gleaves, loss, n_out, stacked)
    clean = (layer_residual(reports[-1]) <= CONSISTENT).reshape(dist.shape)
    fell = clean & (dist > GROSS) & ~(dist < FALLBACK * flat_dist)
    image = jnp.where(fell.reshape((-1,) + (1,) * (image.ndim - 1)), flat, image)
    dist = jnp.where(fell, flat_dist, dist)
    return image, distance_status(reports, dist, fell), (image,) + tuple(inputs[1:]), dist

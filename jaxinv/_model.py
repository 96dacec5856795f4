"""Models: read the layers out of any Flax linen / nnx module or plain ``apply_fn(params, x)``.

A :class:`Model` wraps the user's own forward function and parameters (never a rewrite of it). Its layers are
found by tracing (:mod:`jaxinv._trace`): each *layer* is one weight multiplication (dense or convolution) with
everything affine around it (reshapes, average pooling, an additive bias, input scaling) and the element-wise
activation after it:

.. math:: z_l = A_l(x_{l-1}; W_l) + b_l, \\qquad x_l = s_l(z_l).

The structure is checked against the user's function on a random input before it is trusted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

from . import _trace
from ._activations import SUPPORTED as _SUPPORTED_ACTS
from ._activations import Activation, identify


@dataclasses.dataclass(frozen=True)
class Layer:
    """What jaxinv found about one layer of a model (per example, batch axis excluded).

    Attributes:
        index: position, 0 for the layer that reads the model input.
        path: path of the layer's kernel in the parameter pytree (the layer's name in the model).
        kind: ``dense``, ``conv``, or ``block``: a sub-network with several weights between two points every path
            of the model goes through (a residual block ``x + F(x)``, a skip connection), solved as a whole.
        in_shape: shape of the layer's input ``x_{l-1}`` (the unknown of its linear system).
        out_shape: shape of its pre-activation ``z_l``.
        kernel_shape: shape of the kernel parameter (its gradient gives the gradient rows).
        bias_path: path of the additive bias, or ``None``.
        activation: the activation after the layer (e.g. ``tanh``, ``leaky_relu(0.2)``, ``identity``).
        strides, padding, dilation, groups: convolution hyper-parameters (``None`` for dense layers).
        params: ``(path, shape)`` of every parameter the layer reads (a block's kernels, biases and scales).
    """

    index: int
    path: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    bias_path: str | None
    activation: str
    strides: tuple[int, ...] | None = None
    padding: tuple[tuple[int, int], ...] | None = None
    dilation: tuple[int, ...] | None = None
    groups: int | None = None
    params: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def bias(self) -> bool:
        return self.bias_path is not None

    @property
    def unknowns(self) -> int:
        return int(np.prod(self.in_shape))

    @property
    def forward_rows(self) -> int:
        return int(np.prod(self.out_shape))

    @property
    def gradient_rows(self) -> int:
        if self.kind == "block":
            return int(sum(np.prod(shape) for _, shape in self.params))
        return int(np.prod(self.kernel_shape))

    def signature(self) -> tuple:
        """The layer without its name: equal for the same layer built through different adapters."""
        d = dataclasses.asdict(self)
        d.pop("path"), d.pop("bias_path")
        d["params"] = tuple(shape for _, shape in self.params)
        return tuple(sorted(d.items())) + (("bias", self.bias),)

    def describe(self) -> str:
        if self.kind == "block":
            return (f"{self.path}: block {self.in_shape}->{self.out_shape} ({len(self.params)} parameter arrays, "
                    f"{self.gradient_rows} gradient entries) -> {self.activation}")
        hyper = ""
        if self.kind == "conv":
            hyper = f" stride={self.strides} pad={self.padding} dil={self.dilation} groups={self.groups}"
        return (f"{self.path}: {self.kind} {self.in_shape}->{self.out_shape}{hyper} "
                f"{'+bias ' if self.bias else ''}-> {self.activation}")


@dataclasses.dataclass(eq=False)
class Stage:
    """Executable pieces of one layer (hashable by identity: static in jit)."""

    nodes: _trace.StageNodes
    param_nodes: list
    layer: Layer
    activation: Activation

    def _bind(self, leaves):
        return dict(zip(self.param_nodes, leaves))

    def affine(self, x, leaves, smooth=None):
        """``z = A(x; W) + b`` for one example ``x`` of shape ``(1, *in_shape)`` (a block's map ``f(x)``; with
        ``smooth``, its kinks smoothed at that temperature: :func:`jaxinv._trace.evaluate`)."""
        b = self._bind(leaves)
        b[self.nodes.x_in] = x
        return _trace.evaluate([self.nodes.z], b, smooth)[0]

    def __call__(self, x, leaves):
        return self.activation(self.affine(x, leaves))


@dataclasses.dataclass(eq=False)
class Structure:
    stages: tuple[Stage, ...]
    input_shape: tuple[int, ...]
    dtype: Any

    @property
    def blocks(self) -> list[str]:
        """Paths of the block stages (solved jointly; see :mod:`jaxinv.engine._block`)."""
        return [st.layer.path for st in self.stages if st.nodes.kind == "block"]

    @property
    def layers(self) -> tuple[Layer, ...]:
        return tuple(s.layer for s in self.stages)


class _Cache:
    """Per-input-shape structures of a model (static, hashed by identity)."""

    def __init__(self):
        self.structures: dict = {}

    def __getstate__(self):
        # the traced structures hold JAX primitives, which must not be copied into another process (a copy is a
        # different primitive without differentiation rules): a pickled model re-traces itself where it lands
        return {}

    def __setstate__(self, state):
        self.structures = {}


class UnsupportedModelError(ValueError):
    """The model contains operations the layer-wise methods cannot place (listed in the message)."""


def _path_str(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(getattr(k, "key", getattr(k, "name", k))))
    if len(parts) > 1 and parts[0] == "params":
        parts = parts[1:]
    return "/".join(parts)


def param_paths(params: PyTree) -> list[str]:
    """Readable paths of the parameter leaves, in ``jax.tree_util`` order."""
    return [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


class Model(eqx.Module):
    """A user's model, as the layer-wise methods see it.

    Build it with :func:`from_linen`, :func:`from_nnx` or :func:`from_fn`. It is a pytree whose leaves are the
    parameters, so it passes through ``jax.jit``.

    Attributes:
        params: the parameter pytree (what gradients are shaped like).
        apply_fn: the user's forward function ``apply_fn(params, x) -> logits``, ``x`` of shape ``(B, *input_shape)``.
        name: a display name.
    """

    params: PyTree
    apply_fn: Callable = eqx.field(static=True)
    name: str = eqx.field(static=True)
    default_input_shape: tuple[int, ...] | None = eqx.field(static=True)
    strict: bool = eqx.field(static=True)
    _cache: "_Cache" = eqx.field(static=True, repr=False)

    def __init__(self, apply_fn, params, *, name="model", input_shape=None, strict=True):
        self.params = params
        self.apply_fn = apply_fn
        self.name = name
        self.default_input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.strict = strict
        self._cache = _Cache()
        _check_params(params)
        if self.default_input_shape is not None:
            try:
                self.structure()
            except UnsupportedModelError:
                if strict:
                    raise

    # ----------------------------------------------------------------------------------------- structure
    def resolve_input_shape(self, input_shape=None) -> tuple[int, ...]:
        shape = input_shape if input_shape is not None else self.default_input_shape
        if shape is None:
            raise ValueError(
                f"input_shape is needed for model {self.name!r}: pass input_shape=(H, W, C) (without the batch "
                "axis), or give it when building the Model (from_linen(..., input_shape=...))"
            )
        shape = tuple(int(s) for s in shape)
        if self.default_input_shape is not None and input_shape is not None and shape != self.default_input_shape:
            # allowed (convolutional models take any size), traced separately
            pass
        return shape

    def structure(self, input_shape=None) -> Structure:
        shape = self.resolve_input_shape(input_shape)
        if shape not in self._cache.structures:
            self._cache.structures[shape] = _analyse(self, shape)
        return self._cache.structures[shape]

    def layers(self, input_shape=None) -> tuple[Layer, ...]:
        """The ordered weight layers (input layer first), with their activations and shapes."""
        return self.structure(input_shape).layers

    def summary(self, input_shape=None) -> str:
        return "\n".join(l.describe() for l in self.layers(input_shape))

    @property
    def num_outputs(self) -> int:
        return int(self.output_shape()[-1])

    def output_shape(self, input_shape=None) -> tuple[int, ...]:
        shape = self.resolve_input_shape(input_shape)
        out = jax.eval_shape(self.apply_fn, self.params, jax.ShapeDtypeStruct((1,) + shape, self.dtype))
        return tuple(out.shape[1:])

    @property
    def dtype(self):
        floats = [l for l in jax.tree_util.tree_leaves(self.params) if jnp.issubdtype(jnp.result_type(l), jnp.floating)]
        return jnp.result_type(floats[0]) if floats else jnp.float32

    # -------------------------------------------------------------------------------------------- apply
    def __call__(self, x: Float[Array, "B *shape"]) -> Float[Array, "B K"]:
        """The user's forward pass: ``apply_fn(params, x)``."""
        return self.apply_fn(self.params, x)

    def apply_layers(self, x: Float[Array, "B *shape"], start: int = 0, *, params=None) -> Array:
        """Apply layers ``start..L`` (the suffix of the network) as jaxinv reads them, to a batch ``x``.

        ``x`` is the input of layer ``start`` (``x_{start-1}``, batch axis first); ``start=0`` is the whole model.
        """
        params = self.params if params is None else params
        leaves = jax.tree_util.tree_leaves(params)
        shape = self.resolve_input_shape(None if start else tuple(x.shape[1:]))
        return _apply_stages(self.structure(shape).stages[start:], leaves, x)


@eqx.filter_jit
def _apply_stages(stages, leaves, x):
    def one(xi):
        h = xi[None]
        for s in stages:
            h = s(h, leaves)
        return h[0]

    return jax.vmap(one)(x)


def _check_params(params):
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params is empty: pass the model's parameters (e.g. module.init(key, x))")
    for p, l in zip(param_paths(params), leaves):
        if not hasattr(l, "shape") or not hasattr(l, "dtype"):
            raise TypeError(f"params leaf {p!r} is a {type(l).__name__}, not an array")


def _format_unsupported(model: Model, problems) -> str:
    groups: dict[str, list] = {}
    for n, reason in problems:  # one line per place in the model (a module path or a source line)
        groups.setdefault(n.where or "(unnamed)", []).append((n, reason))
    generic = ("shape change", "'", "not on the model", "activation mixes")
    lines = [f"model {model.name!r} has operations the layer-wise methods cannot place ({len(groups)} place(s)):"]
    for where, items in groups.items():
        reasons = [r for _, r in items]
        best = next((r for r in reasons if not r.startswith(generic)), reasons[0])
        names = {n.name for n, _ in items}
        if {"rsqrt", "reduce_sum"} <= names or ({"sqrt", "reduce_sum", "div"} <= names):
            best = ("normalisation by statistics of the data itself (LayerNorm, GroupNorm, or BatchNorm in training "
                    "form): not an affine map of the layer's input, and the input is identifiable only up to what "
                    "it removes (a positive scale and, without padding, a constant shift per group); the "
                    "layer-wise methods read BatchNorm in inference form (use_running_average=True), a fixed affine "
                    "map")
        elif any(n.name in ("add", "add_any", "sub") and sum(i.dep_input for i in n.inputs) == 2 for n, _ in items):
            best = ("sum of two branches with no weight layer between where they fork and join: the layer-wise "
                    "methods read a residual block x + F(x) as one block only when F has a dense or convolution "
                    "layer")
        prims = ", ".join(dict.fromkeys(n.name for n, _ in items))
        lines.append(f"  - at {where}: {best} [ops: {prims}; shape {list(items[0][0].shape)}]")
    lines.append(
        "Supported: dense and convolution layers (any stride, padding, dilation, groups; bias or not), "
        "BatchNorm in inference form, reshape/flatten/transpose, average pooling, fixed linear resampling (bilinear "
        "upsampling), input scaling, residual blocks, skip connections, max pooling and normalisation by the data's "
        "statistics after a layer (LayerNorm, GroupNorm, BatchNorm in training form: each solved as one block with the "
        "layers around it), and element-wise "
        "activations "
        f"({', '.join(_SUPPORTED_ACTS)}). Optimisation attacks (jaxinv.attack('ig' | 'dlg' | 'idlg', ...)) "
        "work on any differentiable model: build it with strict=False."
    )
    return "\n".join(lines)


def _analyse(model: Model, input_shape: tuple[int, ...]) -> Structure:
    dtype = model.dtype
    x0 = jnp.zeros((1,) + input_shape, dtype)
    try:
        graph = _trace.build_graph(model.apply_fn, model.params, x0)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"input_shape={input_shape} is inconsistent with model {model.name!r}: tracing it on a batch of "
            f"shape {(1,) + input_shape} failed with: {str(e).rstrip('.')}. Pass the shape of one input without the batch axis, "
            "e.g. input_shape=(32, 32, 3)"
        ) from None
    try:
        nodes = _trace.segment(graph)
    except _trace.Unsupported as e:
        raise UnsupportedModelError(_format_unsupported(model, e.problems)) from None
    paths = param_paths(model.params)
    problems, stages = [], []
    for i, sn in enumerate(nodes):
        def act_fn(z, sn=sn):
            return _trace.evaluate([sn.x_out], {sn.z: z})[0]

        act = Activation("identity") if sn.x_out is sn.z else identify(act_fn, sn.z.shape, dtype)
        name = paths[sn.kernel_leaf] if sn.kind == "layer" else _block_path([paths[k] for k in sn.leaves], i)
        if act is None:
            problems.append((sn.x_out, f"activation after layer {name!r} matches none of "
                                       f"{', '.join(_SUPPORTED_ACTS)}, gelu, silu"))
            continue
        read = tuple((paths[k], tuple(graph.params[k].shape)) for k in sn.leaves)
        if sn.kind == "block":
            stages.append(Stage(sn, graph.params, Layer(
                index=i, path=name, kind="block", in_shape=tuple(sn.x_in.shape[1:]), out_shape=tuple(sn.z.shape[1:]),
                kernel_shape=(), bias_path=None, activation=str(act), params=read), act))
            continue
        w = sn.bilinear
        conv = w.name == "conv_general_dilated"
        layer = Layer(
            index=i, path=paths[sn.kernel_leaf], kind="conv" if conv else "dense",
            in_shape=tuple(sn.x_in.shape[1:]), out_shape=tuple(sn.z.shape[1:]),
            kernel_shape=tuple(graph.params[sn.kernel_leaf].shape),
            bias_path=paths[sn.bias_leaf] if sn.bias_leaf >= 0 else None, activation=str(act),
            strides=tuple(w.params["window_strides"]) if conv else None,
            padding=tuple(tuple(int(a) for a in p) for p in w.params["padding"]) if conv else None,
            dilation=tuple(w.params["rhs_dilation"]) if conv else None,
            groups=int(w.params["feature_group_count"]) if conv else None, params=read,
        )
        stages.append(Stage(sn, graph.params, layer, act))
    if problems:
        raise UnsupportedModelError(_format_unsupported(model, problems))
    if sum(int(np.prod(s.nodes.x_in.shape)) == 0 for s in stages):
        raise ValueError(f"model {model.name!r} has an empty layer input")
    if stages[0].nodes.x_in.shape[0] != 1:
        raise UnsupportedModelError(f"model {model.name!r}: the first layer does not act per example")
    structure = Structure(tuple(stages), input_shape, dtype)
    _verify(model, structure)
    return structure


def _block_path(paths: list[str], index: int) -> str:
    """A block's name: the longest common module path of its parameters (e.g. ``ResBlock_0``)."""
    split = [p.split("/") for p in paths]
    common = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if split and len(common) == min(len(p) for p in split):
        common = common[:-1]  # a single parameter: its module
    if common:
        return "/".join(common)
    modules = list(dict.fromkeys("/".join(p[:-1]) or p[0] for p in split))
    return f"block[{','.join(modules)}]" if modules else f"block_{index}"


def _verify(model: Model, structure: Structure):
    """The layers as read must reproduce the user's function (else the reading is wrong: refuse it)."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (1,) + structure.input_shape, structure.dtype)

    @jax.jit  # one compilation of both (op-by-op evaluation of a whole model is far slower)
    def both(params, x):
        leaves = jax.tree_util.tree_leaves(params)
        h = x
        for s in structure.stages:
            h = s(h, leaves)
        return model.apply_fn(params, x), h

    ref, h = both(model.params, x)
    ref, h = np.asarray(ref, np.float64), np.asarray(h, np.float64).reshape(np.shape(ref))
    err = np.max(np.abs(ref - h)) / (np.max(np.abs(ref)) + 1e-12)
    if not np.isfinite(err) or err > 1e-3:
        raise UnsupportedModelError(
            f"model {model.name!r}: the layers jaxinv read ({[l.describe() for l in structure.layers]}) do not "
            f"reproduce apply_fn (relative error {err:.2e}); the model has a structure jaxinv does not support. "
            "Use the optimisation attacks (strict=False)."
        )


# ------------------------------------------------------------------------------------------------ adapters
def from_fn(apply_fn: Callable, params: PyTree, *, input_shape=None, name: str = "model", strict: bool = True) -> Model:
    """Wrap a plain forward function ``apply_fn(params, x) -> logits``.

    Args:
        apply_fn: pure function of the parameter pytree and a batch ``x`` of shape ``(B, *input_shape)``.
        params: the parameters (the gradient a client shares has this structure).
        input_shape: shape of one input without the batch axis, e.g. ``(32, 32, 3)``; if given, the model is
            read (and checked) now, otherwise at first use.
        name: display name.
        strict: raise on operations the layer-wise methods cannot place; ``False`` keeps the model usable by the
            optimisation attacks.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable apply_fn(params, x), got {type(apply_fn).__name__}")
    return Model(apply_fn, params, name=name, input_shape=input_shape, strict=strict)


def from_linen(module, params: PyTree, *, input_shape=None, name: str | None = None, strict: bool = True) -> Model:
    """Wrap a Flax linen module and its variables (``module.init(...)``, with or without the ``params`` key).

    The gradient pytree must have the structure of ``params`` as given here; other collections of the variables
    (e.g. BatchNorm's ``batch_stats``) are state held fixed, not parameters (the gradient is ``{"params": ...}``).
    BatchNorm is read in inference form (``use_running_average=True``: a fixed per-channel affine map after
    its layer); in training form its statistics are data-dependent and the model is refused with a clear error.
    """
    try:
        import flax.linen as nn
    except ImportError as e:  # pragma: no cover
        raise ImportError("from_linen needs flax: pip install flax") from e
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a flax.linen.Module, got {type(module).__name__}; use from_nnx / from_fn")
    if isinstance(params, dict) and "params" in params:
        variables_have_params = True
    else:
        variables_have_params = False

    if variables_have_params:
        # other collections (BatchNorm's running statistics, ...) are state, not parameters: held fixed, and the
        # gradient pytree is that of {"params": ...} alone
        rest = {k: v for k, v in params.items() if k != "params"}
        params = {"params": params["params"]}

        mutable = sorted(rest)  # BatchNorm in training form updates its statistics: allow it, drop the update

        def apply_fn(p, x):
            if mutable:
                return module.apply({**p, **rest}, x, mutable=mutable)[0]
            return module.apply(p, x)
    else:
        def apply_fn(p, x):
            return module.apply({"params": p}, x)

    return Model(apply_fn, params, name=name or type(module).__name__, input_shape=input_shape, strict=strict)


def from_nnx(module, *, input_shape=None, name: str | None = None, strict: bool = True) -> Model:
    """Wrap a Flax nnx module. Its ``nnx.Param`` state is the parameter pytree (gradients are shaped like
    ``nnx.state(module, nnx.Param)``); other state (batch statistics, RNGs) is held fixed."""
    try:
        from flax import nnx
    except ImportError as e:  # pragma: no cover
        raise ImportError("from_nnx needs flax>=0.10: pip install flax") from e
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be a flax.nnx.Module, got {type(module).__name__}; use from_linen / from_fn")
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    return Model(apply_fn, params, name=name or type(module).__name__, input_shape=input_shape, strict=strict)

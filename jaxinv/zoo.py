"""The architectures of the gradient-inversion papers, as Flax linen modules.

Every model is a plain feed-forward network: convolutions (each followed by one
activation), a flatten, optional hidden dense layers, and a dense head whose
output goes through one last activation. All models share one module class,
:class:`ZooNet`, built from one table of layer specifications (:func:`info`).

Conventions (the same for every zoo model):

* **Inputs** are NHWC images with pixel values in ``[0, 1]``. The first
  operation of every model is ``x = x - 0.5``: the papers feed
  ``pixel / 255 - 0.5``, so putting the shift inside the model keeps the
  papers' networks *and* lets reconstructions live in ``[0, 1]`` image space,
  where :mod:`jaxinv.metrics` measures them with ``data_range=1``.
* **Initialisation** is PyTorch's default (what the papers used, untrained):
  every kernel and bias entry is drawn from

  .. math::

      w \\sim \\mathcal{U}\\left(-\\tfrac{1}{\\sqrt{n_\\text{in}}},\\,
      \\tfrac{1}{\\sqrt{n_\\text{in}}}\\right), \\qquad
      n_\\text{in} = \\begin{cases} c_\\text{in} k_h k_w & \\text{convolution} \\\\
      d_\\text{in} & \\text{dense} \\end{cases}

  (``kaiming_uniform(a=sqrt(5))`` for weights, the same bound for biases). The
  distribution matches; the random stream does not (JAX keys, not torch seeds).
* Padding is explicit and symmetric, ``((p, p), (p, p))``, as in PyTorch.
* Flatten is ``x.reshape(x.shape[0], -1)`` of the NHWC tensor, so the head's
  input order is (H, W, C), not PyTorch's (C, H, W): the same system up to a
  permutation of the head's rows.

Example:
    >>> import jax
    >>> from jaxinv import zoo
    >>> module, variables = zoo.build("cnn3_c1", key=jax.random.key(0))
    >>> x = jax.numpy.zeros((1, *zoo.input_shape("cnn3_c1")))
    >>> module.apply(variables, x).shape
    (1, 10)

References:
    * S. Chen and J. Campbell (Chen & Campbell), COPA layer-wise gradient
      inversion; models ``cnn*_c*`` from ``targets.py`` of the authors' code.
    * J. Zhu and M. Blaschko, "R-GAP: Recursive Gradient Attack on Privacy",
      ICLR 2021; models CNN6, CNN6-d and FCN3.
    * L. Zhu, Z. Liu and S. Han, "Deep Leakage from Gradients", NeurIPS 2019;
      the LeNet variant.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import positive_int
from ._training import Checkpoint, accuracy, train

__all__ = [
    "Checkpoint",
    "accuracy",
    "train",
    "FCNSeg",
    "ModernInfo",
    "ResNet",
    "UNetSeg",
    "modern_names",
    "ConvLayer",
    "DenseLayer",
    "ModelInfo",
    "ZooNet",
    "activation",
    "build",
    "info",
    "input_shape",
    "make_cnn",
    "names",
    "num_classes",
]

_LEAKY_DEFAULT = 0.01


# --------------------------------------------------------------------------- #
# Activations
# --------------------------------------------------------------------------- #

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "identity": lambda x: x,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "elu": jax.nn.elu,
    "softplus": jax.nn.softplus,
}
_ACTIVATION_HELP = (
    "one of 'identity', 'tanh', 'sigmoid', 'relu', 'elu', 'softplus', "
    "'leaky_relu' (negative slope 0.01) or 'leaky_relu:<slope>' (e.g. 'leaky_relu:0.2')"
)


def _leaky_slope(spec: str) -> float | None:
    """The negative slope of a ``'leaky_relu[:slope]'`` spec, ``None`` if not leaky."""
    if spec == "leaky_relu":
        return _LEAKY_DEFAULT
    if spec.startswith("leaky_relu:"):
        try:
            slope = float(spec.split(":", 1)[1])
        except ValueError:
            return math.nan
        return slope
    return None


def _check_activation(spec: Any, where: str) -> str:
    if not isinstance(spec, str):
        raise TypeError(f"{where} must be a string, {_ACTIVATION_HELP}; got {spec!r}.")
    slope = _leaky_slope(spec)
    if slope is None and spec not in _ACTIVATIONS:
        raise ValueError(f"{where}: unknown activation {spec!r}; use {_ACTIVATION_HELP}.")
    if slope is not None and not math.isfinite(slope):
        raise ValueError(
            f"{where}: cannot read the slope of {spec!r}; write e.g. 'leaky_relu:0.2'."
        )
    return spec


def activation(spec: str) -> Callable[[Array], Array]:
    """The element-wise function named by an activation string.

    Args:
        spec: ``'identity'``, ``'tanh'``, ``'sigmoid'``, ``'relu'``, ``'elu'``,
            ``'softplus'``, ``'leaky_relu'`` (negative slope 0.01, Chen &
            Campbell's) or ``'leaky_relu:<slope>'`` (e.g. ``'leaky_relu:0.2'``,
            R-GAP's).

    Returns:
        A function of one array built only from ``jnp`` / ``jax.nn`` ops.

    Raises:
        ValueError: unknown name or unreadable slope.
    """
    _check_activation(spec, "activation")
    slope = _leaky_slope(spec)
    if slope is not None:
        return functools.partial(jax.nn.leaky_relu, negative_slope=slope)
    return _ACTIVATIONS[spec]


# --------------------------------------------------------------------------- #
# Initialisation
# --------------------------------------------------------------------------- #


def _torch_uniform(fan_in: int) -> Callable[..., Array]:
    """PyTorch's default init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: PRNGKeyArray, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        # Drawn flat, then reshaped: the same distribution, and on CPU a flat draw
        # compiles several times faster than an N-d one (eager init compiles once per shape).
        flat = jax.random.uniform(key, (math.prod(shape),), dtype, minval=-bound, maxval=bound)
        return flat.reshape(shape)

    return init


# --------------------------------------------------------------------------- #
# The module
# --------------------------------------------------------------------------- #


class ZooNet(nn.Module):
    """Convolutions, flatten, hidden dense layers, dense head; one activation after each.

    .. math::

        h_0 = x - s, \\quad h_{i+1} = \\sigma_i(W_i * h_i + b_i), \\quad
        f(x) = \\sigma_L(W_L \\operatorname{vec}(h_L) + b_L)

    Build it with :func:`make_cnn` (custom variants) or :func:`build` (the zoo).
    Parameter names are linen's defaults: ``Conv_0, Conv_1, ...`` then
    ``Dense_0, ...``; the last ``Dense_*`` is the head.

    Attributes:
        convs: ``(out_channels, kernel, stride, padding)`` per convolution
            (square kernels and strides, symmetric padding).
        activations: one activation string per layer (convs, then hidden dense
            layers, then the head); see :func:`activation`.
        num_classes: width of the head.
        hidden: widths of dense layers between the flatten and the head.
        conv_bias: whether the convolutions have biases.
        hidden_bias: whether the hidden dense layers have biases.
        head_bias: whether the head has a bias.
        shift: subtracted from the input first (0.5 maps ``[0, 1]`` images to
            the papers' ``[-0.5, 0.5]``); ``0.0`` adds no operation.
    """

    convs: tuple[tuple[int, int, int, int], ...]
    activations: tuple[str, ...]
    num_classes: int
    hidden: tuple[int, ...] = ()
    conv_bias: bool = False
    hidden_bias: bool = False
    head_bias: bool = True
    shift: float = 0.5

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B K"]:
        if x.ndim != 4:
            raise ValueError(
                f"ZooNet expects NHWC images of shape (batch, height, width, channels); got "
                f"shape {x.shape}. Add a batch axis with x[None]."
            )
        n_layers = len(self.convs) + len(self.hidden) + 1
        if len(self.activations) != n_layers:
            raise ValueError(
                f"ZooNet needs one activation per layer ({n_layers}: convs, hidden, head); got "
                f"{len(self.activations)}. Use 'identity' for none."
            )
        acts = iter(self.activations)
        if self.shift != 0.0:
            x = x - self.shift
        for out_channels, kernel, stride, padding in self.convs:
            fan_in = x.shape[-1] * kernel * kernel
            x = nn.Conv(
                out_channels,
                (kernel, kernel),
                strides=(stride, stride),
                padding=((padding, padding), (padding, padding)),
                use_bias=self.conv_bias,
                kernel_init=_torch_uniform(fan_in),
                bias_init=_torch_uniform(fan_in),
            )(x)
            x = activation(next(acts))(x)
        x = x.reshape(x.shape[0], -1)
        widths = [(w, self.hidden_bias) for w in self.hidden] + [(self.num_classes, self.head_bias)]
        for width, bias in widths:
            fan_in = x.shape[-1]
            x = nn.Dense(
                width,
                use_bias=bias,
                kernel_init=_torch_uniform(fan_in),
                bias_init=_torch_uniform(fan_in),
            )(x)
            x = activation(next(acts))(x)
        return x


def make_cnn(
    convs: Sequence[tuple[int, int, int, int]],
    activations: Sequence[str],
    *,
    num_classes: int,
    conv_bias: bool = False,
    head_bias: bool = True,
    shift: float = 0.5,
) -> ZooNet:
    """A convolutional network: convs, flatten, dense head (for architecture variants).

    Args:
        convs: one ``(out_channels, kernel, stride, padding)`` per convolution;
            kernels and strides are square, padding is symmetric
            ``((p, p), (p, p))``. The input channels are taken from the input.
        activations: ``len(convs) + 1`` activation strings: one after each
            convolution, the last one applied to the logits. ``'identity'``
            means none; see :func:`activation` for the names
            (``'leaky_relu'`` has slope 0.01, ``'leaky_relu:0.2'`` sets it).
        num_classes: output width of the dense head.
        conv_bias: give the convolutions biases.
        head_bias: give the dense head a bias.
        shift: subtracted from the input first; 0.5 means the model takes
            images in ``[0, 1]`` and computes on ``[-0.5, 0.5]`` like the papers.

    Returns:
        An unbound :class:`ZooNet`; initialise with ``module.init(key, x)``
        (PyTorch-default uniform init, see the module docstring).

    Raises:
        ValueError / TypeError: malformed conv tuples, wrong number of
            activations or unknown activation names.

    Example:
        >>> net = make_cnn([(6, 3, 1, 0)], ["tanh", "identity"], num_classes=10)
    """
    conv_tuples = []
    for i, conv in enumerate(convs):
        if not isinstance(conv, Sequence) or len(conv) != 4:
            raise ValueError(
                f"convs[{i}] must be a tuple (out_channels, kernel, stride, padding); got {conv!r}."
            )
        out_channels, kernel, stride, padding = conv
        conv_tuples.append(
            (
                positive_int(out_channels, f"convs[{i}] out_channels"),
                positive_int(kernel, f"convs[{i}] kernel"),
                positive_int(stride, f"convs[{i}] stride"),
                positive_int(padding, f"convs[{i}] padding", minimum=0),
            )
        )
    if isinstance(activations, str):
        raise TypeError(
            f"activations must be a sequence of strings, not the string {activations!r}; "
            f"write e.g. [{activations!r}, 'identity']."
        )
    acts = tuple(_check_activation(a, f"activations[{i}]") for i, a in enumerate(activations))
    if len(acts) != len(conv_tuples) + 1:
        raise ValueError(
            f"activations needs len(convs) + 1 = {len(conv_tuples) + 1} entries (one per "
            f"convolution, then one for the logits; 'identity' for none); got {len(acts)}."
        )
    return ZooNet(
        convs=tuple(conv_tuples),
        activations=acts,
        num_classes=positive_int(num_classes, "num_classes"),
        conv_bias=bool(conv_bias),
        head_bias=bool(head_bias),
        shift=float(shift),
    )


# --------------------------------------------------------------------------- #
# The zoo table
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """A convolution as the papers write it: ``(in, out, kernel, stride, padding)``."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    bias: bool


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """A dense layer ``in_features -> out_features``."""

    in_features: int
    out_features: int
    bias: bool


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Description of one zoo model (the row of the papers' table).

    Attributes:
        name: zoo name, e.g. ``'cnn3_c1'``.
        source: the paper / code the architecture comes from.
        input_shape: ``(H, W, C)`` of one image.
        num_classes: output width.
        layers: the body: convolutions, then hidden dense layers.
        head: the final dense layer.
        activations: one per layer of ``layers``, then one for ``head``.
    """

    name: str
    source: str
    input_shape: tuple[int, int, int]
    num_classes: int
    layers: tuple[ConvLayer | DenseLayer, ...]
    head: DenseLayer
    activations: tuple[str, ...]


_CHEN = "Chen & Campbell (COPA), targets.py of the authors' code"
_RGAP = "Zhu & Blaschko, R-GAP (ICLR 2021), models/ of the R-GAP code"
_DLG = "Zhu, Liu & Han, Deep Leakage from Gradients (NeurIPS 2019), LeNet"
_CIFAR = (32, 32, 3)


def _chen(name: str, convs: list[tuple[int, ...]], dense_in: int, acts: list[str]) -> ModelInfo:
    return ModelInfo(
        name=name,
        source=_CHEN,
        input_shape=_CIFAR,
        num_classes=10,
        layers=tuple(ConvLayer(*c, bias=False) for c in convs),
        head=DenseLayer(dense_in, 10, bias=True),
        activations=tuple(acts),
    )


_T3, _L = ["tanh"] * 3, "leaky_relu"
_T3I = _T3 + ["identity"]
_LENET = [(3, 12, 5, 2, 2), (12, 12, 5, 2, 2), (12, 12, 5, 1, 2)]
_CNN6 = [(3, 12, 4, 2, 2), (12, 36, 3, 2, 1), (36, 36, 3, 1, 1), (36, 36, 3, 1, 1),
         (36, 64, 3, 2, 1), (64, 128, 3, 1, 1)]  # fmt: skip
_CNN6_D = [(3, 12, 4, 2, 2), (12, 20, 3, 2, 1), (20, 36, 3, 1, 1), (36, 36, 3, 1, 1),
           (36, 64, 3, 2, 1), (64, 128, 3, 1, 1)]  # fmt: skip
_R02 = "leaky_relu:0.2"


def _cnn6(name: str, source: str, convs: list[tuple[int, ...]], classes: int) -> ModelInfo:
    """R-GAP's CNN6 family: six bias-free leaky-ReLU(0.2) convs and a dense head (with a bias when ``classes > 1``)."""
    return ModelInfo(name=name, source=source, input_shape=_CIFAR, num_classes=classes,
                     layers=tuple(ConvLayer(*c, bias=False) for c in convs),
                     head=DenseLayer(3200, classes, bias=classes > 1), activations=(_R02,) * 6 + ("identity",))

_TABLE: tuple[ModelInfo, ...] = (
    _chen("cnn2_c0", [(3, 1, 3, 2, 0)], 225, ["tanh", "tanh"]),
    _chen("cnn2_c1", [(3, 6, 3, 1, 0)], 5400, ["tanh", "identity"]),
    _chen("cnn2_c2", [(3, 6, 4, 2, 0)], 1350, ["tanh", "identity"]),
    _chen("cnn2_c4", [(3, 1, 3, 1, 0)], 900, ["tanh", "tanh"]),
    _chen("cnn2_c5", [(3, 3, 3, 1, 1)], 3072, ["tanh", "tanh"]),
    _chen("cnn2_c6", [(3, 12, 5, 2, 0)], 2352, ["tanh", "identity"]),
    _chen("cnn2_c11", [(3, 6, 3, 1, 0)], 5400, [_L, "sigmoid"]),
    _chen("cnn2_c21", [(3, 6, 4, 2, 0)], 1350, [_L, "sigmoid"]),
    _chen("cnn2_c41", [(3, 1, 3, 1, 0)], 900, [_L, "sigmoid"]),
    _chen("cnn3_c1", [(3, 6, 3, 1, 0), (6, 3, 4, 2, 0)], 588, ["tanh", "tanh", "identity"]),
    _chen("cnn3_c2", [(3, 6, 4, 2, 0), (6, 3, 3, 2, 0)], 147, ["tanh", "tanh", "identity"]),
    _chen("cnn3_c3", [(3, 6, 3, 1, 0), (6, 9, 3, 1, 0)], 7056, ["tanh", "tanh", "identity"]),
    _chen("cnn3_c4", [(3, 1, 3, 1, 0), (1, 6, 3, 1, 0)], 4704, ["tanh", "tanh", "identity"]),
    _chen("cnn3_c6", [(3, 6, 3, 1, 0), (6, 3, 4, 2, 0)], 588, [_L, _L, "tanh"]),
    _chen("cnn3_c7", [(3, 6, 3, 1, 0), (6, 3, 4, 2, 0)], 588, ["tanh", _L, "tanh"]),
    _chen("cnn3_c8", [(3, 9, 3, 1, 0), (9, 3, 4, 2, 0)], 588, _T3),
    _chen("cnn3_c9", [(3, 5, 3, 1, 0), (5, 7, 3, 1, 0)], 5488, _T3),
    _chen("cnn3_c11", [(3, 6, 3, 1, 0), (6, 3, 4, 2, 0)], 588, [_L, _L, "sigmoid"]),
    _chen("cnn4_c1", [(3, 6, 3, 1, 0), (6, 5, 4, 2, 0), (5, 3, 4, 1, 0)], 363, _T3I),
    _chen("cnn4_c2", [(3, 16, 5, 1, 0), (16, 6, 5, 2, 0), (6, 32, 5, 1, 2)], 4608, _T3I),
    _chen("cnn4_c3", [(3, 6, 5, 1, 0), (6, 16, 5, 2, 0), (16, 16, 5, 1, 2)], 2304, _T3I),
    ModelInfo(
        name="lenet",
        source="LeNet of DLG as copied by Chen & Campbell (COPA): leaky_relu(0.01), identity head",
        input_shape=_CIFAR,
        num_classes=10,
        layers=tuple(ConvLayer(*c, bias=True) for c in _LENET),
        head=DenseLayer(768, 10, bias=True),
        activations=(_L, _L, _L, "identity"),
    ),
    ModelInfo(
        name="lenet_dlg",
        source=_DLG + " (sigmoid, CIFAR-100 head)",
        input_shape=_CIFAR,
        num_classes=100,
        layers=tuple(ConvLayer(*c, bias=True) for c in _LENET),
        head=DenseLayer(768, 100, bias=True),
        activations=("sigmoid", "sigmoid", "sigmoid", "identity"),
    ),
    _cnn6("cnn6", _RGAP + " (CNN6)", _CNN6, classes=1),
    _cnn6("cnn6_d", _RGAP + " (CNN6-d, rank-deficient)", _CNN6_D, classes=1),
    _cnn6("cnn6_head10", "jaxinv variant of R-GAP's CNN6: its convs with a 10-class dense head with bias", _CNN6,
          classes=10),
    ModelInfo(
        name="fcn3",
        source=_RGAP + " (FCN3, MNIST)",
        input_shape=(28, 28, 1),
        num_classes=1,
        layers=(DenseLayer(784, 1000, bias=False), DenseLayer(1000, 100, bias=False)),
        head=DenseLayer(100, 1, bias=False),
        activations=(_R02, _R02, _R02),
    ),
)
_ZOO: dict[str, ModelInfo] = {m.name: m for m in _TABLE}


def names() -> tuple[str, ...]:
    """Names of the papers' zoo models, in table order (Chen & Campbell, LeNet, R-GAP); the modern
    architectures (segmentation, residual) are :func:`modern_names`."""
    return tuple(_ZOO)


def modern_names() -> tuple[str, ...]:
    """Names of the modern zoo models: ``fcn_seg``, ``unet_seg`` (segmentation, per-pixel cross-entropy with
    mask labels) and ``resnet8`` (residual blocks); see :class:`ModernInfo`."""
    return tuple(_MODERN)


def info(name: str) -> ModelInfo | ModernInfo:
    """The table row of a zoo model: source, input shape, layers, activations, head.

    Raises:
        ValueError: unknown name (the message lists the known names).
    """
    if name in _MODERN:
        return _MODERN[name]
    if name not in _ZOO:
        raise ValueError(f"Unknown zoo model {name!r}; choose one of: {', '.join(tuple(_ZOO) + tuple(_MODERN))}.")
    return _ZOO[name]


def input_shape(name: str) -> tuple[int, int, int]:
    """``(H, W, C)`` of one input image: (32, 32, 3), or (28, 28, 1) for ``fcn3``."""
    return info(name).input_shape


def num_classes(name: str) -> int:
    """Output width of a zoo model (1 for R-GAP's single-logit models)."""
    return info(name).num_classes


def _module(spec: ModelInfo) -> ZooNet:
    convs = [layer for layer in spec.layers if isinstance(layer, ConvLayer)]
    hidden = [layer for layer in spec.layers if isinstance(layer, DenseLayer)]
    return ZooNet(
        convs=tuple((c.out_channels, c.kernel, c.stride, c.padding) for c in convs),
        activations=spec.activations,
        num_classes=spec.num_classes,
        hidden=tuple(d.out_features for d in hidden),
        conv_bias=any(c.bias for c in convs),  # the table never mixes biased and unbiased
        hidden_bias=any(d.bias for d in hidden),
        head_bias=spec.head.bias,
        shift=0.5,
    )


def build(
    name: str,
    *,
    key: PRNGKeyArray,
    input_shape: tuple[int, int, int] | None = None,
    dtype: Any = jnp.float32,
) -> tuple[ZooNet, dict[str, Any]]:
    """Build and initialise a zoo model.

    Args:
        name: one of :func:`names`.
        key: PRNG key for the (PyTorch-default, uniform) initialisation; the
            same key gives the same parameters.
        input_shape: ``(H, W, C)`` to initialise for; defaults to the paper's
            (:func:`input_shape`). Another size changes the head's width.
        dtype: floating dtype of the parameters. They are always drawn in
            float32 and then cast, so ``jnp.float64`` (with ``jax_enable_x64``)
            gives the same weights in double precision, e.g. for rank computations.

    Returns:
        ``(module, variables)``: the unbound linen module and the full
        variables dict ``{'params': ...}`` from ``module.init`` on a
        ``(1, H, W, C)`` zero input. Apply with
        ``module.apply(variables, images)``, ``images`` NHWC in ``[0, 1]``.

    Raises:
        ValueError: unknown name, or a malformed ``input_shape``.
    """
    spec = info(name)
    if isinstance(spec, ModernInfo):
        return _build_modern(spec, key, input_shape, dtype)
    shape = spec.input_shape if input_shape is None else tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(
            f"input_shape must be (height, width, channels) of positive ints; got {input_shape!r}."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype such as jnp.float32; got {dtype!r}.")
    module = _module(spec)
    variables = module.init(key, jnp.zeros((1, *shape), jnp.float32))
    variables = jax.tree.map(lambda p: p.astype(dtype), dict(variables))
    return module, variables


# --------------------------------------------------------------------------- #
# Modern architectures: segmentation (FCN, U-Net) and residual networks
# --------------------------------------------------------------------------- #


class FCNSeg(nn.Module):
    """A fully convolutional segmentation network in the FCN-32s/16s style (Long et al. 2015).

    Strided convolutions (``(channels, kernel 3, stride 2, padding 1)``, each followed by ``act``) down to a score
    map at ``1/2**len(channels)`` resolution, a 1x1 convolution with bias to ``num_classes`` scores, and a fixed
    bilinear upsampling (``jax.image.resize``) back to the input size: logits ``(B, H, W, K)``, trained with
    per-pixel cross-entropy against a mask ``(B, H, W)``. The default (32x32 input, score map 2x2) has a
    *determined head* when at least 4 classes are present in the mask (:mod:`jaxinv.engine._seg`).
    """

    channels: tuple[int, ...] = (32, 128, 128, 64)
    num_classes: int = 21
    act: str = "leaky_relu:0.2"
    shift: float = 0.5

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W K"]:
        B, H, W, _ = x.shape
        x = x - self.shift
        for c in self.channels:
            fan_in = x.shape[-1] * 9
            x = nn.Conv(c, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                        kernel_init=_torch_uniform(fan_in))(x)
            x = activation(self.act)(x)
        fan_in = x.shape[-1]
        x = nn.Conv(self.num_classes, (1, 1), kernel_init=_torch_uniform(fan_in), bias_init=_torch_uniform(fan_in))(x)
        return jax.image.resize(x, (B, H, W, self.num_classes), "bilinear")


class UNetSeg(nn.Module):
    """A small U-Net (Ronneberger et al. 2015): two resolutions, skip connection by concatenation.

    ``enc`` (3x3 conv, stride 1) -> ``down`` (3x3 conv, stride 2) -> ``mid`` (3x3 conv) -> nearest-neighbour
    upsampling x2 -> concatenate with ``enc``'s output -> ``dec`` (3x3 conv) -> 1x1 conv head with bias at full
    resolution: logits ``(B, H, W, K)``. The skip connection and the full-resolution head (``H*W`` positions,
    far more than classes) are what the layer-wise methods cannot invert: it is audited by the optimisation
    attacks (built with ``strict=False``).
    """

    width: int = 16
    num_classes: int = 21
    act: str = "leaky_relu:0.2"
    shift: float = 0.5

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W K"]:
        a = activation(self.act)
        x = x - self.shift

        def conv(h, c, k=3, s=1, bias=False, name=None):
            fan_in = h.shape[-1] * k * k
            return nn.Conv(c, (k, k), strides=(s, s), padding=((k // 2, k // 2),) * 2, use_bias=bias,
                           kernel_init=_torch_uniform(fan_in), bias_init=_torch_uniform(fan_in), name=name)(h)

        e = a(conv(x, self.width, name="enc"))
        d = a(conv(e, 2 * self.width, s=2, name="down"))
        m = a(conv(d, 2 * self.width, name="mid"))
        u = jnp.repeat(jnp.repeat(m, 2, axis=1), 2, axis=2)
        h = a(conv(jnp.concatenate([u, e], axis=-1), self.width, name="dec"))
        return conv(h, self.num_classes, k=1, bias=True, name="head")


class ResNet(nn.Module):
    """A CIFAR ResNet (He et al. 2016, section 4.2): ``6n + 2`` weight layers; ``n = 1`` is ResNet-8.

    3x3 stem convolution, three stages of ``n`` basic blocks (``widths``, the 2nd and 3rd stage start with
    stride 2 and a 1x1 projection shortcut), each block ``act(x + conv(act(conv(x))))``, global average pooling
    and a dense head with bias. ``norm="none"`` (default) leaves normalisation out (federated training often
    drops BatchNorm: its statistics leak and drift across clients); ``"batch"`` adds BatchNorm in inference form
    (running statistics, a fixed affine map), ``"group"`` GroupNorm (4 groups).
    """

    blocks_per_stage: int = 1
    widths: tuple[int, int, int] = (16, 32, 64)
    num_classes: int = 10
    act: str = "relu"
    norm: str = "none"
    shift: float = 0.5

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B K"]:
        if self.norm not in ("none", "batch", "group"):
            raise ValueError(f"norm must be 'none', 'batch' or 'group', got {self.norm!r}")
        a = activation(self.act)
        x = x - self.shift

        def conv(h, c, k, s):
            fan_in = h.shape[-1] * k * k
            return nn.Conv(c, (k, k), strides=(s, s), padding=((k // 2, k // 2),) * 2, use_bias=self.norm == "none",
                           kernel_init=_torch_uniform(fan_in), bias_init=_torch_uniform(fan_in))(h)

        def norm(h):
            if self.norm == "batch":
                return nn.BatchNorm(use_running_average=True)(h)
            if self.norm == "group":
                return nn.GroupNorm(num_groups=4)(h)
            return h

        h = a(norm(conv(x, self.widths[0], 3, 1)))
        for stage, width in enumerate(self.widths):
            for b in range(self.blocks_per_stage):
                s = 2 if (stage > 0 and b == 0) else 1
                y = a(norm(conv(h, width, 3, s)))
                y = norm(conv(y, width, 3, 1))
                short = h if (s == 1 and h.shape[-1] == width) else norm(conv(h, width, 1, s))
                h = a(short + y)
        h = jnp.mean(h, axis=(1, 2))
        fan_in = h.shape[-1]
        return nn.Dense(self.num_classes, kernel_init=_torch_uniform(fan_in), bias_init=_torch_uniform(fan_in))(h)


@dataclasses.dataclass(frozen=True)
class ModernInfo:
    """Description of a modern zoo model.

    Attributes:
        name: zoo name.
        source: where the architecture comes from.
        input_shape: ``(H, W, C)`` of one image.
        num_classes: classes (per pixel for segmentation).
        task: ``"segmentation"`` (logits ``(H, W, K)``, mask labels ``(H, W)``) or ``"classification"``.
        layerwise: whether the layer-wise methods (COPA, the security metric) can read it; if not, it is built
            for the optimisation attacks (``jaxinv.from_linen(..., strict=False)``).
        make: builds the linen module.
    """

    name: str
    source: str
    input_shape: tuple[int, int, int]
    num_classes: int
    task: str
    layerwise: bool
    make: Callable[[], nn.Module]


_MODERN: dict[str, ModernInfo] = {m.name: m for m in (
    ModernInfo("fcn_seg", "jaxinv: FCN-32s/16s-style segmentation net (Long et al. 2015), 2x2 score map, "
               "bilinear upsampling, 21 classes (PASCAL VOC's count)", _CIFAR, 21, "segmentation", True, FCNSeg),
    ModernInfo("unet_seg", "jaxinv: small U-Net (Ronneberger et al. 2015), one skip connection, 21 classes",
               _CIFAR, 21, "segmentation", True, UNetSeg),
    ModernInfo("resnet8", "He et al. 2016 CIFAR ResNet with n = 1 (ResNet-8), no normalisation", _CIFAR, 10,
               "classification", True, ResNet),
)}


def _build_modern(spec: ModernInfo, key, input_shape, dtype):
    shape = spec.input_shape if input_shape is None else tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(f"input_shape must be (height, width, channels) of positive ints; got {input_shape!r}.")
    module = spec.make()
    variables = module.init(key, jnp.zeros((1, *shape), jnp.float32))
    variables = jax.tree.map(lambda p: p.astype(dtype), dict(variables))
    return module, variables

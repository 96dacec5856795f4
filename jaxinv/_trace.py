"""From a user's ``apply_fn(params, x)`` to a graph of primitive operations, and from the graph to layers.

The model is traced once with ``jax.make_jaxpr``; calls (``jit``, ``custom_jvp``, ``custom_vjp``, ``remat``) are
inlined, giving a DAG of :class:`Node` s whose leaves are the model input, the parameter leaves and constants.
:func:`segment` then cuts the DAG into *stages*

    ``x_{l-1} --(affine in x, bilinear in (x, kernel), + bias)--> z_l --(element-wise activation)--> x_l``

which is exactly the structure the layer-wise method needs; a branched region between two nodes every path goes
through (a residual block, a skip connection) with weights inside becomes one *block* stage ``u -> z -> x``, and so
does a layer with the max pooling or normalisation after it. Nothing about Flax is assumed: any model whose
computation has this structure is accepted, whichever library built it, and every operation that does not fit
is reported with where it comes from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

try:  # jax >= 0.4.30
    from jax.extend.core import ClosedJaxpr, Jaxpr, Literal
except ImportError:  # pragma: no cover
    from jax.core import ClosedJaxpr, Jaxpr, Literal  # type: ignore


# ------------------------------------------------------------------------------------------------ primitives
# Linear in their (single) activation operand, no parameters: part of a layer's operator.
LINEAR = {
    "reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim", "convert_element_type", "copy", "copy_p",
    "reduce_sum", "reduce_window_sum", "pad", "slice", "rev", "neg", "reduce_precision", "cumsum",
}
# Affine when exactly one operand depends on the input (and the others are constants or parameters).
ARITH = {"add", "sub", "mul", "div", "add_any"}
# Bilinear in (activation, kernel): the weight layers.
BILINEAR = {"dot_general", "conv_general_dilated"}
# Element-wise and nonlinear: may appear inside an activation.
ELEMENTWISE = {
    "tanh", "logistic", "exp", "exp2", "log", "log1p", "expm1", "max", "min", "select_n", "ge", "gt", "le", "lt",
    "eq", "ne", "abs", "sign", "erf", "erfc", "erf_inv", "sqrt", "rsqrt", "cbrt", "pow", "integer_pow", "square",
    "sin", "cos", "clamp", "not", "and", "or", "stop_gradient", "is_finite", "atan2", "sinh", "cosh", "asinh",
    "tan", "atan", "floor", "ceil", "round", "nextafter", "logaddexp",
} | ARITH | {"convert_element_type", "copy", "copy_p", "neg", "reduce_precision"}
# Max pooling: nonlinear (an argmax per window); read with the weight layer before it as one block.
MAX_POOL = {"reduce_window_max", "reduce_max"}
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_DESCRIBE = {
    "reduce_window_max": "max pooling",
    "reduce_window_min": "min pooling",
    "reduce_max": "max reduction (global max pooling?)",
    "argmax": "argmax",
    "dot_general": "product of two activations (attention?)",
    "rsqrt": "normalisation (division by a data-dependent scale)",
    "reduce_sum": "data-dependent reduction (normalisation / softmax?)",
    "gather": "gather / indexing",
    "concatenate": "concatenation of branches (a U-Net skip connection?): the layer-wise methods follow one path",
}


@dataclasses.dataclass(eq=False)
class Node:
    """One value of the traced computation."""

    kind: str  # "input" | "param" | "const" | "op"
    shape: tuple[int, ...]
    dtype: Any
    prim: Any = None
    params: dict = dataclasses.field(default_factory=dict)
    inputs: tuple["Node", ...] = ()
    index: int = 0  # output index for multi-output primitives
    value: Any = None  # constants
    leaf: int = -1  # parameter leaf index
    where: str = ""  # module path (name stack) or source line
    consumers: list["Node"] = dataclasses.field(default_factory=list)
    dep_input: bool = False
    dep_params: frozenset = frozenset()

    @property
    def name(self) -> str:
        return self.prim.name if self.prim is not None else self.kind

    def __repr__(self) -> str:  # short, for error messages
        return f"{self.name}{list(self.shape)}@{self.where or '?'}"


@dataclasses.dataclass(eq=False)
class Graph:
    input: Node
    params: list[Node]
    output: Node
    nodes: list[Node]  # topological order (op nodes only)


def _where(eqn) -> str:
    try:
        ns = str(eqn.source_info.name_stack)
    except Exception:  # pragma: no cover
        ns = ""
    if ns:
        return ns
    try:
        from jax._src import source_info_util

        return source_info_util.summarize(eqn.source_info)
    except Exception:  # pragma: no cover
        return ""


def _inner(eqn):
    for key in _CALLS:
        sub = eqn.params.get(key)
        if isinstance(sub, ClosedJaxpr):
            return sub.jaxpr, list(sub.consts)
        if isinstance(sub, Jaxpr):
            return sub, []
    return None


def build_graph(apply_fn: Callable, params: Any, x_example: jax.Array) -> Graph:
    """Trace ``apply_fn(params, x_example)`` into a :class:`Graph` with calls inlined."""
    closed = jax.make_jaxpr(apply_fn)(params, x_example)
    leaves = jax.tree_util.tree_leaves(params)
    n_leaves = len(leaves)
    nodes: list[Node] = []
    pnodes = [Node("param", tuple(np.shape(l)), jnp.result_type(l), leaf=i, dep_params=frozenset([i]))
              for i, l in enumerate(leaves)]
    inode = Node("input", tuple(x_example.shape), x_example.dtype, dep_input=True)

    def const(v) -> Node:
        return Node("const", tuple(np.shape(v)), jnp.result_type(v), value=v)

    def walk(jaxpr, in_nodes, consts, outer_where=""):
        env: dict = {}

        def read(v):
            if isinstance(v, Literal):
                return const(v.val)
            return env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = const(c)
        for v, n in zip(jaxpr.invars, in_nodes):
            env[v] = n
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            where = _where(eqn) or outer_where
            sub = _inner(eqn)
            if sub is not None:
                outs = walk(sub[0], ins, sub[1], where)
            else:
                outs = []
                for i, ov in enumerate(eqn.outvars):
                    aval = ov.aval
                    n = Node("op", tuple(aval.shape), aval.dtype, prim=eqn.primitive, params=dict(eqn.params),
                             inputs=tuple(ins), index=i, where=where)
                    n.dep_input = any(x.dep_input for x in ins)
                    n.dep_params = frozenset().union(*[x.dep_params for x in ins]) if ins else frozenset()
                    n.multi = len(eqn.outvars) > 1  # type: ignore[attr-defined]
                    for x in ins:
                        x.consumers.append(n)
                    nodes.append(n)
                    outs.append(n)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [read(v) for v in jaxpr.outvars]

    outs = walk(closed.jaxpr, pnodes[:n_leaves] + [inode], list(closed.consts))
    if len(outs) != 1:
        raise ValueError(
            f"apply_fn must return one array of logits, got {len(outs)} outputs; wrap it as "
            "`lambda p, x: apply_fn(p, x)[0]` (or the logits entry)"
        )
    return Graph(input=inode, params=pnodes, output=outs[0], nodes=nodes)


def _smoothed(n: Node, args: list, t):
    r"""``n``'s value with its kink smoothed at temperature ``t`` (``None`` when ``n`` has no kink we smooth).

    :math:`\max(a, b) = b + (a - b)_+ \approx b + t\,\mathrm{softplus}((a - b)/t)` (ReLU is :math:`b = 0`),
    :math:`\min` likewise, and max pooling by the log-sum-exp of each window,
    :math:`t \log\sum_{i \in w} e^{x_i / t}`: every unit of a window gets a share of the gradient (its softmax
    weight) instead of the argmax alone. Both tend to the exact operation as :math:`t \to 0`."""
    if n.name in ("max", "min") and len(args) == 2:
        a, b = jnp.broadcast_arrays(*args)
        sp = t * jax.nn.softplus((a - b) / t) if n.name == "max" else -t * jax.nn.softplus((b - a) / t)
        return b + sp if n.name == "max" else a + sp
    if n.name == "reduce_max":
        return t * jax.nn.logsumexp(args[0] / t, axis=tuple(n.params["axes"]))
    if n.name == "reduce_window_max":
        p = n.params
        if any(d != 1 for d in tuple(p["base_dilation"]) + tuple(p["window_dilation"])):
            return None
        x = jax.lax.pad(args[0], jnp.array(-jnp.inf, args[0].dtype), [(lo, hi, 0) for lo, hi in p["padding"]])
        out = n.shape
        windows = []
        for off in np.ndindex(*p["window_dimensions"]):
            limit = [o + s * (k - 1) + 1 for o, s, k in zip(off, p["window_strides"], out)]
            windows.append(jax.lax.slice(x, off, limit, p["window_strides"]))
        return t * jax.nn.logsumexp(jnp.stack(windows) / t, axis=0)
    return None


def evaluate(targets: Sequence[Node], bindings: dict, smooth=None) -> list:
    """Evaluate ``targets`` given values for some nodes (``bindings``: Node -> array).

    Used to replay a stage ``x_{l-1} -> z_l`` (binding ``x_{l-1}`` and the parameter leaves) or an activation
    ``z_l -> x_l``. Reaching the model input unbound means the piece is not self-contained: an internal error.
    With ``smooth`` (a positive temperature), the kinks inside (ReLU, max, max pooling) are smoothed
    (:func:`_smoothed`): continuation for the nonlinear block solves.
    """
    memo = dict(bindings)

    def ev(n: Node):
        if n in memo:
            return memo[n]
        if n.kind == "const":
            v = n.value
        elif n.kind in ("input", "param"):
            raise RuntimeError(f"jaxinv internal error: unbound {n.kind} while replaying a layer")
        else:
            args = [ev(i) for i in n.inputs]
            v = None if smooth is None or not n.dep_input else _smoothed(n, args, smooth)
            if v is None:
                v = n.prim.bind(*args, **n.params)
            if getattr(n, "multi", False):
                v = v[n.index]
        memo[n] = v
        return v

    # Iterative topological evaluation would avoid recursion limits; layer regions are short, so recursion is fine.
    return [ev(t) for t in targets]


# ------------------------------------------------------------------------------------------------ segmentation
@dataclasses.dataclass(eq=False)
class StageNodes:
    """The nodes of one stage ``x_{l-1} -> z_l -> x_l``.

    A *layer* stage (``kind="layer"``) is affine in ``x_in`` with one kernel; a *block* stage (``kind="block"``:
    a residual block, a skip connection) is the whole sub-graph between two nodes every path of the model goes
    through, with all its weights (``leaves``), nonlinear in ``x_in``."""

    x_in: Node  # u_l: the stage input (model input or previous activation output)
    bilinear: Node | None  # the kernel multiplication (None for a block)
    kernel_leaf: int  # -1 for a block
    bias_leaf: int  # -1 when absent
    z: Node  # pre-activation (after bias)
    x_out: Node  # activation output (== z for identity)
    act_region: list[Node]
    kind: str = "layer"
    leaves: tuple[int, ...] = ()  # every parameter leaf the stage reads (kernel and bias; all of a block's)


class Unsupported(Exception):
    """Raised by :func:`segment` with the list of offending nodes and reasons."""

    def __init__(self, problems: list[tuple[Node, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{n!r}: {r}" for n, r in problems))


def _act_operands(n: Node) -> list[Node]:
    return [i for i in n.inputs if i.dep_input]


def _is_affine(n: Node, scale_ok: bool = False) -> bool:
    """Affine in its activation operand, with no parameter other than an additive bias (and, with
    ``scale_ok``, a multiplication by a parameter-dependent factor: a learned scale after the weight)."""
    ops = _act_operands(n)
    if len(ops) != 1:
        return False
    if n.name in LINEAR:
        return True
    if n.name in BILINEAR:  # by a constant matrix (e.g. bilinear upsampling's interpolation weights): linear
        return not any(i.dep_params for i in n.inputs if not i.dep_input)
    if n.name in ARITH:
        others = [i for i in n.inputs if not i.dep_input]
        if n.name == "div" and n.inputs[0] is not ops[0]:
            return False
        if n.name in ("mul", "div") and any(o.dep_params for o in others) and not scale_ok:
            return False  # learned scale: not a plain bias
        return True
    return False


def _cut_nodes(g: Graph) -> list[Node]:
    """The nodes every path from the model input to its output goes through, in order (input and output included).

    With the nodes on input-to-output paths in topological order, a node is on every path iff no edge jumps over
    it (an edge from before it to after it would start a path that avoids it)."""
    anc = _ancestors(g.output)
    order = [g.input] + [n for n in g.nodes if n.dep_input and n in anc]
    pos = {n: k for k, n in enumerate(order)}
    cover = np.zeros(len(order) + 1, np.int64)
    for n in order:
        for i in n.inputs:
            if i in pos and pos[n] - pos[i] > 1:
                cover[pos[i] + 1] += 1
                cover[pos[n]] -= 1
    jumped = np.cumsum(cover)
    return [n for k, n in enumerate(order) if jumped[k] == 0]


@dataclasses.dataclass(eq=False)
class _Branch:
    """A branched region between two consecutive cut nodes (a residual block, a skip connection) with weights."""

    entry: Node  # where the branches fork
    exit: Node  # where they join
    inner: set  # nodes strictly between


def _branches(g: Graph, is_weight: Callable[[Node], bool]) -> list[_Branch]:
    cuts = _cut_nodes(g)
    out = []
    for a, b in zip(cuts, cuts[1:]):
        inner = _between(a, b) - {a, b}
        if inner and any(is_weight(n) for n in inner | {b}):
            out.append(_Branch(a, b, inner))
    return out


def _attached_units(g: Graph, act_nodes: list[Node], in_branch: set, is_weight) -> list[_Branch]:
    """Nonlinear maps that mix units, on the main path after a weight layer: with that layer, one block.

    Max pooling (which unit of each window passes is the argmax of the unknown pre-pooling values) and
    normalisation by the data's own statistics (LayerNorm, GroupNorm, BatchNorm in training form: a branched
    region without weights, whose branches meet after a reduction) are not element-wise, so the layer before them
    cannot be inverted by one linear solve; as a block ``u -> N(act(W u + b))``, its input solves the layer's
    forward and gradient constraints through them (:mod:`jaxinv.engine._block`)."""
    order = {n: k for k, n in enumerate(g.nodes)}
    weights = [n for n in act_nodes if is_weight(n) and n not in in_branch]
    spots = [n for n in act_nodes if n.name in MAX_POOL and n not in in_branch]
    cuts = _cut_nodes(g)
    for a, b in zip(cuts, cuts[1:]):
        inner = _between(a, b) - {a, b}
        if inner and not inner & in_branch and any(n.name not in ELEMENTWISE for n in inner | {b}):
            spots.append(b)  # a weightless branched region that mixes units (normalisation)
    groups: dict = {}  # weight -> (its input, the last spot after it, the region between)
    for p in spots:
        anc = _ancestors(p)
        before = [w for w in weights if w in anc]
        if not before:
            continue  # before the first weight layer: reported as unsupported
        w = max(before, key=order.get)
        entry = _act_operands(w)[0]
        region = _between(entry, p)
        if region & in_branch:
            continue  # a residual block lies between: not attached (reported as unsupported)
        if w not in groups or order[p] > order[groups[w][1]]:
            groups[w] = (entry, p, region - {entry, p})
    return [_Branch(*v) for v in groups.values()]


def _stage_leaves(region: set) -> tuple[int, ...]:
    """Parameter leaves read directly by the nodes of ``region`` (through their non-activation operands)."""
    leaves: set = set()
    for n in region:
        for i in n.inputs:
            if not i.dep_input:
                leaves |= i.dep_params
    return tuple(sorted(leaves))


def segment(g: Graph) -> list[StageNodes]:
    """Cut the graph into stages; raise :class:`Unsupported` listing every operation that does not fit.

    The graph is first cut at the nodes every path goes through (:func:`_cut_nodes`). A region between two such
    nodes that branches and holds weights (a residual block ``x + F(x)``, a skip connection joined by a sum or a
    concatenation) becomes one *block* stage; the weights on the single path become *layer* stages."""
    problems: list[tuple[Node, str]] = []
    live = _ancestors(g.output)  # values the output does not use (BatchNorm's statistics update) are ignored
    act_nodes = [n for n in g.nodes if n.dep_input and n in live]

    def is_weight(n: Node) -> bool:
        return n.name in BILINEAR and any(i.dep_params for i in n.inputs if not i.dep_input)

    branches = _branches(g, is_weight)
    in_branch = set().union(*[b.inner | {b.exit} for b in branches]) if branches else set()
    branches += _attached_units(g, act_nodes, in_branch, is_weight)
    in_branch = set().union(*[b.inner | {b.exit} for b in branches]) if branches else set()
    for n in act_nodes:
        ops = _act_operands(n)
        if n.name in BILINEAR:
            others = [i for i in n.inputs if not i.dep_input]
            if len(ops) != 1:
                problems.append((n, _DESCRIBE["dot_general"]))
            elif not others or not others[0].dep_params:
                pass  # a fixed linear map (constant kernel): handled as part of an operator
            elif len(others[0].dep_params) != 1:
                problems.append((n, "kernel built from several parameter arrays"))
        elif n.name in LINEAR or n.name in ELEMENTWISE:
            if n.name in ELEMENTWISE and n.name not in LINEAR and n.name not in ARITH:
                if any(i.dep_params for i in n.inputs if not i.dep_input):
                    problems.append((n, "activation with learned parameters (e.g. PReLU)"))
        elif n.name == "concatenate" and n in in_branch:
            pass  # joins the branches of a block (a U-Net skip): the block is solved as a whole
        elif n.name in MAX_POOL and n in in_branch:
            pass  # max pooling inside a block (its argmax pattern is part of the block's nonlinear map)
        else:
            problems.append((n, _DESCRIBE.get(n.name, f"operation '{n.name}'")))

    weights = [n for n in act_nodes if is_weight(n)]
    if not weights:
        raise Unsupported(problems + [(g.output, "no weight layer (dense or convolution with a parameter kernel)")])
    order = {n: k for k, n in enumerate(g.nodes)}
    units = sorted([w for w in weights if w not in in_branch] + branches,
                   key=lambda u: order[u.exit] if isinstance(u, _Branch) else order[u])

    stages: list[StageNodes] = []
    prev_x = g.input
    for unit in units:
        block = isinstance(unit, _Branch)
        start = unit.entry if block else _act_operands(unit)[0]
        # walk back from the weight's operand (a block's fork) through affine single-consumer ops to the stage input
        u = start
        while (u is not prev_x and u.kind == "op" and _is_affine(u) and (len(u.consumers) == 1 or u is start)
               and not is_weight(u)):
            if any(i.dep_params for i in u.inputs if not i.dep_input):
                problems.append((u, "parameter added before the weight layer (unsupported affine pre-map)"))
                break
            (u,) = _act_operands(u)
        if stages:
            # u must be the previous stage's activation output; collect the activation region z -> u
            s = stages[-1]
            s.x_out, s.act_region = u, _region(s.z, u, problems)
        elif u is not g.input:
            problems.append((u, "nonlinear operation before the first weight layer"))
        # walk forward from the weight (the block's join) through affine single-consumer ops: bias, reshapes, pooling
        z, bias = (unit.exit if block else unit), -1
        while z is not g.output and len(z.consumers) == 1:
            c = z.consumers[0]
            if not _is_affine(c, scale_ok=True) or is_weight(c):
                break
            pdeps = [i for i in c.inputs if not i.dep_input and i.dep_params]
            if block:
                pass  # a block's parameters are all its own: read below from its region
            elif pdeps and c.name in ("mul", "div"):
                # a learned scale after the weight (BatchNorm in inference form: gamma / sqrt(var + eps)): still
                # affine in x; a bias added before it is no longer z's plain additive bias
                bias = -1
            elif pdeps:
                if c.name not in ("add", "sub", "add_any") or len(pdeps[0].dep_params) != 1 or bias >= 0:
                    problems.append((c, "parameter used other than as kernel or additive bias (normalisation?)"))
                    break
                (bias,) = tuple(pdeps[0].dep_params)
            z = c
        if block:
            region = _between(u, z) - {u}
            stages.append(StageNodes(u, None, -1, -1, z, z, [], "block", _stage_leaves(region)))
        else:
            kernel = next(i for i in unit.inputs if not i.dep_input)
            (kleaf,) = tuple(kernel.dep_params)
            leaves = _stage_leaves(_between(u, z) - {u})
            stages.append(StageNodes(u, unit, kleaf, bias, z, z, [], "layer", leaves))
        prev_x = z
    last = stages[-1]
    last.x_out, last.act_region = g.output, _region(last.z, g.output, problems)
    # every activation-dependent node must belong to some stage
    covered = set()
    for s in stages:
        covered |= _between(s.x_in, s.z) | set(s.act_region) | {s.z, s.x_out}
    for n in act_nodes:
        if n not in covered:
            problems.append((n, "not on the model's main path (residual connection or a branch?)"))
    if problems:
        seen, unique = set(), []
        for n, r in problems:  # one line per operation, the first reason found
            if n not in seen:
                seen.add(n)
                unique.append((n, r))
        raise Unsupported(unique)
    return stages


def _reachable(n: Node, step: Callable[[Node], Iterable[Node]]) -> set:
    """Every node reachable from ``n`` (itself included) by repeatedly following ``step``."""
    seen, stack = set(), [n]
    while stack:
        m = stack.pop()
        if m not in seen:
            seen.add(m)
            stack.extend(step(m))
    return seen


def _ancestors(n: Node) -> set:
    return _reachable(n, lambda m: (i for i in m.inputs if i.dep_input))


def _descendants(n: Node) -> set:
    return _reachable(n, lambda m: m.consumers)


def _between(a: Node, b: Node) -> set:
    """Nodes on paths from ``a`` to ``b`` (both included)."""
    return _ancestors(b) & _descendants(a)


def _region(z: Node, x: Node, problems) -> list[Node]:
    """The element-wise activation region between pre-activation ``z`` and output ``x``."""
    if x is z:
        return []
    region = _between(z, x) - {z}
    if x not in region:
        problems.append((x, "activation output does not depend on the layer's pre-activation"))
        return []
    for n in region:
        if n.name not in ELEMENTWISE:
            problems.append((n, _DESCRIBE.get(n.name, f"'{n.name}' inside an activation (not element-wise)")))
        elif n.shape != z.shape and n.dtype != jnp.bool_:
            problems.append((n, "shape change inside an activation"))
        for i in n.inputs:
            if not i.dep_input and i.dep_params:
                problems.append((n, "activation with learned parameters (e.g. PReLU)"))
            if i.dep_input and i not in region and i is not z:
                problems.append((n, "activation mixes the pre-activation with another branch"))
    order = {id(n): k for k, n in enumerate(_topo(x))}
    return sorted(region, key=lambda n: order.get(id(n), 0))


def _topo(x: Node) -> list[Node]:
    out, seen = [], set()

    def visit(n):
        if n in seen:
            return
        seen.add(n)
        for i in n.inputs:
            visit(i)
        out.append(n)

    visit(x)
    return out

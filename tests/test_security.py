"""Tests of jaxinv.security: ranks against dense matrices, the COPA index against the reference, errors, CLI."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinv
from jaxinv import UnsupportedModelError, data, zoo
from jaxinv.engine import LayerSystem, loss_fn
# the metric's counting rules and score (and, monkeypatched, its certificate size limits) are internals
from jaxinv._security import RANK_TOL, count_conv_rank, predict_psnr, rgap_analysis
from jaxinv._security import _certificates as certificates

from helpers import psnr, tiny_cnn


def _tiny(convs=((4, 3, 1, 0),), acts=("tanh", "identity"), shape=(8, 8, 2), classes=3, seed=0, **kw):
    return tiny_cnn(convs, acts, size=shape[0], channels=shape[2], classes=classes, seed=seed, **kw)


def tiny_factory(key=None):
    """For the CLI test: ``test_security:tiny_factory`` returns (linen module, variables)."""
    module = zoo.make_cnn([(3, 3, 2, 0)], ["tanh", "identity"], num_classes=3)
    return module, module.init(key if key is not None else jax.random.key(0), jnp.zeros((1, 8, 8, 2)))


def _deltas(model, key):
    """The per-layer inputs and deltas security() analyses (its documented key split)."""
    st = model.structure()
    leaves = jax.tree_util.tree_leaves(model.params)
    k_x, k_y, _, _ = jax.random.split(key, 4)
    x = jax.random.uniform(k_x, (1,) + st.input_shape)
    n_out = math.prod(st.stages[-1].nodes.x_out.shape)
    y = jax.random.randint(k_y, (), 0, 2 if n_out == 1 else n_out)
    lf = loss_fn("auto", n_out)
    zs, h = [], x
    for s in st.stages:
        z = s.affine(h, leaves)
        zs.append(z)
        h = s.activation(z)

    def obj(eps):
        h = x
        for s, e in zip(st.stages, eps):
            h = s.activation(s.affine(h, leaves) + e)
        return lf(h.reshape(1, -1), y.reshape(1))

    return st, leaves, jax.grad(obj)([jnp.zeros_like(z) for z in zs])


def _dense_system(stage, leaves, delta):
    """The layer's forward and gradient blocks as dense matrices, from the engine's operators (jax.jacfwd)."""
    sys = LayerSystem.build(stage, leaves, delta)
    x0 = jnp.zeros(sys.x_struct.shape, sys.x_struct.dtype)
    n = x0.size
    A = np.asarray(jax.jacfwd(sys.forward)(x0), np.float64).reshape(-1, n)
    B = np.asarray(jax.jacfwd(sys.gradient)(x0), np.float64).reshape(-1, n)
    return A, B


def _rank(M):
    return int(np.linalg.matrix_rank(M)) if M.size else 0  # numpy's default tolerance (float64 SVD)


def _balanced(A, B):
    na, nb = np.linalg.norm(A, 2), np.linalg.norm(B, 2)
    return np.vstack([A / (na or 1.0), B / (nb or 1.0)])


CASES = {
    "deficient_s1": dict(convs=((1, 3, 1, 0),), acts=("tanh", "identity")),
    "stride2_uncovered": dict(convs=((2, 3, 2, 0),), acts=("tanh", "identity"), shape=(9, 9, 2)),
    "padded_full": dict(convs=((3, 3, 1, 1),), acts=("tanh", "identity")),
    "two_layers": dict(convs=((4, 3, 1, 0), (2, 2, 2, 0)), acts=("tanh", "leaky_relu:0.2", "identity")),
    "bias_sigmoid": dict(convs=((2, 4, 2, 1),), acts=("sigmoid", "identity"), conv_bias=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ranks_equal_dense_matrix_rank(case):
    model = _tiny(**CASES[case])
    key = jax.random.key(3)
    rep = jaxinv.security(model, key=key)
    st, leaves, deltas = _deltas(model, key)
    assert len(rep.layers) == len(st.stages)
    for r, stage, delta in zip(rep.layers, st.stages, deltas):
        A, B = _dense_system(stage, leaves, delta)
        if r.role == "head":  # solved from its gradient rows alone
            want = _rank(B)
        else:
            want = _rank(_balanced(A, B))
        assert r.rank == want, (case, r.path, r.method)
        assert r.deficiency == A.shape[1] - want
        assert r.forward_rank == _rank(A), (case, r.path)
        assert r.unknowns == A.shape[1] and r.gradient_rows == B.shape[0]
        assert r.exact


def test_padding_rows_give_the_same_deficit():
    """The COPA convention (unknowns = padded input + identity rows on the pad) has the same rank deficit."""
    model = _tiny(convs=((2, 3, 2, 1),), acts=("tanh", "identity"), shape=(7, 7, 2))
    key = jax.random.key(1)
    rep = jaxinv.security(model, key=key)
    st, leaves, deltas = _deltas(model, key)
    W = leaves[st.stages[0].nodes.kernel_leaf]
    delta = deltas[0]
    xp0 = jnp.zeros((1, 9, 9, 2))
    dn = ("NHWC", "HWIO", "NHWC")

    def conv(xp, w):
        return jax.lax.conv_general_dilated(xp, w, (2, 2), "VALID", dimension_numbers=dn)

    Ap = np.asarray(jax.jacfwd(lambda xp: conv(xp, W))(xp0), np.float64).reshape(-1, xp0.size)
    Bp = np.asarray(jax.jacfwd(lambda xp: jax.vjp(lambda w: conv(xp, w), W)[1](delta)[0])(xp0),
                    np.float64).reshape(-1, xp0.size)
    pad = np.ones((9, 9, 2), bool)
    pad[1:8, 1:8] = False
    P = np.eye(xp0.size)[pad.reshape(-1)]  # one identity row per pad entry
    rank_padded = _rank(np.vstack([_balanced(Ap, Bp), P]))
    r = rep.layers[0]
    assert r.padding_rows == int(pad.sum())
    assert rank_padded - xp0.size == r.rank_deficit == r.rank - r.unknowns


def test_dense_layers_and_fcn():
    module = zoo.ZooNet(convs=(), activations=("leaky_relu:0.2", "identity"), num_classes=1, hidden=(12,),
                        conv_bias=False, hidden_bias=False, head_bias=False, shift=0.0)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
    model = jaxinv.from_linen(module, variables, input_shape=(4, 4, 1))
    rep = jaxinv.security(model, key=jax.random.key(0))
    st, leaves, deltas = _deltas(model, jax.random.key(0))
    for r, stage, delta in zip(rep.layers, st.stages, deltas):
        A, B = _dense_system(stage, leaves, delta)
        assert r.rank == r.unknowns == _rank(B)  # delta x^T: full column rank
        assert r.forward_rank == _rank(A)
    assert rep.copa_index == 0


# (name, reference COPA index, reference per-layer deficiencies below the head where architectures.md gives them)
REFERENCE = [
    ("cnn2_c0", -2821, [2821]),
    ("cnn2_c4", -2146, [2146]),
    ("cnn3_c2", -1995, [1470, 1050]),
    ("cnn6_d", -233, [0, 280, 0, 0, 0, 0]),
]


@pytest.mark.parametrize("name,index,deficiencies", REFERENCE)
def test_copa_index_matches_reference(name, index, deficiencies):
    module, variables = zoo.build(name, key=jax.random.key(7))  # any init: the ranks are generic
    model = jaxinv.from_linen(module, variables, input_shape=zoo.input_shape(name))
    rep = jaxinv.security(model, key=jax.random.key(11))
    assert rep.copa_index == index
    assert [r.deficiency for r in rep.layers[:-1]] == deficiencies
    assert all(r.exact for r in rep.layers)
    # the rank decisions have a wide gap: accepted pivots far above, rejected ones below the tolerance
    for r in rep.layers:
        assert r.gap[0] > 10 * RANK_TOL and r.gap[1] < RANK_TOL
    if name == "cnn6_d":  # R-GAP's own rank-deficient example: deficient in the input-side reading only
        assert rep.rgap_index < 0 and [r.deficit > 0 for r in rep.rgap_layers][1]
        assert rgap_analysis(rep.layers, "output_side")[0] == 0


REFERENCE_ALL = {
    "cnn2_c0": -2821, "cnn2_c1": 0, "cnn2_c2": -1470, "cnn2_c4": -2146, "cnn2_c5": 0, "cnn2_c6": -189,
    "cnn3_c1": -2266, "cnn3_c2": -1995, "cnn3_c3": 0, "cnn3_c4": -2146, "cnn3_c8": -3544, "cnn3_c9": 0,
    "cnn4_c1": -2772, "cnn4_c2": -6211, "cnn4_c3": -220, "lenet": 0, "lenet_dlg": 0, "cnn6": 0, "cnn6_d": -233,
}  # fmt: skip


def test_counting_rules_give_every_reference_index():
    """From the shapes alone (no weights, no gradient): the counting rules give all 19 reference indices."""
    for name, want in REFERENCE_ALL.items():
        info = zoo.info(name)
        H, W, C = info.input_shape
        defs = []
        for layer in info.layers:
            c = count_conv_rank((H, W), C, layer.out_channels, (layer.kernel, layer.kernel), (layer.stride,) * 2,
                                  ((layer.padding, layer.padding),) * 2)
            defs.append(c["deficiency"])
            (H, W), C = c["out_spatial"], layer.out_channels
        L = len(defs) + 1
        assert sum(round(-d * (L - i - 1) / (L - 1)) for i, d in enumerate(defs)) == want, name


def test_score_is_monotone_in_lost_energy_and_conditioning():
    model = _tiny(convs=((6, 3, 1, 0),), acts=("tanh", "identity"), shape=(8, 8, 2))
    layers = jaxinv.security(model, key=jax.random.key(0)).layers
    base = predict_psnr(layers)
    lossy = (dataclasses.replace(layers[0], lost_energy=0.3),) + layers[1:]
    worse = (dataclasses.replace(layers[0], sigma_min=layers[0].sigma_min / 100),) + layers[1:]
    assert predict_psnr(lossy) < base and predict_psnr(worse) < base
    assert abs(predict_psnr(lossy) - (-10 * math.log10(0.3 * 0.25))) < 0.5  # input-layer loss dominates


def test_counting_rules_agree_with_exact_ranks():
    for convs, shape in [(((3, 3, 1, 0),), (10, 10, 3)), (((6, 4, 2, 0),), (12, 12, 3)),
                         (((5, 3, 2, 1),), (11, 11, 4))]:
        model = _tiny(convs=convs, acts=("tanh", "identity"), shape=shape)
        rep = jaxinv.security(model, key=jax.random.key(0))
        L = model.layers()[0]
        c = count_conv_rank(L.in_shape[:2], L.in_shape[2], L.kernel_shape[3], L.kernel_shape[:2], L.strides,
                              L.padding)
        assert c["rank"] == rep.layers[0].rank, convs


def test_tile_certificate_matches_dense(monkeypatch):
    model = _tiny(convs=((24, 5, 2, 2),), acts=("leaky_relu:0.2", "identity"), shape=(24, 24, 3))
    dense = jaxinv.security(model, key=jax.random.key(0))
    monkeypatch.setattr(certificates, "TILE_MIN", 100)  # force the tile certificate on this small layer
    tiled = jaxinv.security(model, key=jax.random.key(0))
    assert "tile certificate" in tiled.layers[0].method and tiled.layers[0].exact
    assert tiled.layers[0].rank == dense.layers[0].rank == 24 * 24 * 3
    # a deficient layer too large for the structured paths: only a counting estimate, flagged as such
    model = _tiny(convs=((2, 3, 2, 1),), acts=("tanh", "identity"), shape=(24, 24, 3))
    monkeypatch.setattr(certificates, "TILE_MIN", 20000)
    exact = jaxinv.security(model, key=jax.random.key(0)).layers[0]
    monkeypatch.setattr(certificates, "TILE_MIN", 100)
    monkeypatch.setattr(certificates, "DENSE_MAX", 10)
    est = jaxinv.security(model, key=jax.random.key(0)).layers[0]
    assert exact.exact and not est.exact and "counting" in est.method
    assert est.rank >= exact.rank  # counting gives an upper bound on the rank


def test_deterministic_under_key_and_generic_across_keys():
    model = _tiny(convs=((2, 3, 1, 0), (3, 3, 2, 0)), acts=("tanh", "tanh", "identity"), shape=(10, 10, 2))
    a = jaxinv.security(model, key=jax.random.key(5)).to_dict()
    b = jaxinv.security(model, key=jax.random.key(5)).to_dict()
    strip = lambda d: {k: v for k, v in d.items() if k != "seconds"} | {  # noqa: E731
        "layers": [{k: v for k, v in layer.items() if k != "seconds"} for layer in d["layers"]]}
    assert strip(a) == strip(b)
    c = jaxinv.security(model, key=jax.random.key(6)).to_dict()
    assert [r["rank"] for r in c["layers"]] == [r["rank"] for r in a["layers"]]  # ranks are generic
    json.dumps(a)  # JSON-friendly


def test_client_and_its_legacy_keywords():
    """``client=Client(...)`` and the earlier flat keywords give the same report; unknown keywords, a keyword that
    contradicts the client, and an unsupported combination are refused before any work."""
    model = _tiny(convs=((2, 3, 1, 0),), acts=("tanh", "identity"), shape=(8, 8, 2))
    strip = lambda d: {k: v for k, v in d.items() if k != "seconds"} | {  # noqa: E731
        "layers": [{k: v for k, v in layer.items() if k != "seconds"} for layer in d["layers"]]}
    key = jax.random.key(2)
    a = jaxinv.security(model, key=key, client=jaxinv.Client(loss="cross_entropy"), probes=2).to_dict()
    b = jaxinv.security(model, key=key, loss="cross_entropy", probes=2).to_dict()
    assert strip(a) == strip(b)
    with pytest.raises(TypeError, match="unexpected keyword"):
        jaxinv.security(model, key=key, steps=3)
    with pytest.raises(TypeError, match="both as keyword and on the Client"):
        jaxinv.security(model, key=key, client=jaxinv.Client(loss="logistic"), loss="cross_entropy")
    with pytest.raises(ValueError, match="not supported"):
        jaxinv.security(model, key=key, batch_size=2, local_steps=2, local_lr=0.1)
    with pytest.raises(ValueError, match="probes"):
        jaxinv.security(model, key=key, probes=0)


def test_report_fields_table_and_with_grads():
    model = _tiny(convs=((6, 3, 1, 0),), acts=("tanh", "identity"), shape=(8, 8, 2))
    rep = jaxinv.security(model, key=jax.random.key(0))
    assert rep.copa_index == 0 and rep.rgap_index == 0 and rep.verdict.startswith("LEAKS")
    assert rep.score > 30 and rep.advice
    text = rep.table()
    assert "COPA index" in text and "Conv_0/kernel" in text and "verdict" in text
    x = jax.random.uniform(jax.random.key(1), (1, 8, 8, 2))
    grads = jaxinv.client_gradient(model, x, jnp.array([1]))
    rg = jaxinv.security(model, key=jax.random.key(0), grads=grads)
    assert rg.label == 1 and "reconstruction" in rg.delta_source
    assert [r.rank for r in rg.layers] == [r.rank for r in rep.layers]
    deficient = _tiny(convs=((1, 3, 2, 0),), acts=("tanh", "identity"), shape=(8, 8, 2))
    rd = jaxinv.security(deficient, key=jax.random.key(0))
    assert rd.copa_index < 0 and not rd.verdict.startswith("LEAKS")
    assert any("protects the input" in a.text for a in rd.advice)


# ------------------------------------------------------------------------------------------------ errors
def test_unsupported_layer_propagates():
    import flax.linen as nn

    class Normed(nn.Module):  # the input normalised before the first weight layer
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), padding="VALID")(nn.LayerNorm()(x))
            x = jnp.tanh(x)
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    variables = Normed().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    model = jaxinv.from_linen(Normed(), variables, strict=False)
    with pytest.raises(UnsupportedModelError, match="normalisation by statistics of the data"):
        jaxinv.security(model, input_shape=(8, 8, 1), key=jax.random.key(0))


def test_input_shape_mismatch():
    module, variables = zoo.build("cnn2_c0", key=jax.random.key(0))
    model = jaxinv.from_linen(module, variables, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="input_shape"):
        jaxinv.security(model, input_shape=(28, 28, 3), key=jax.random.key(0))


def test_nan_weights_named():
    model = _tiny()
    params = jax.tree_util.tree_map(lambda a: a, model.params)
    params["params"]["Conv_0"]["kernel"] = params["params"]["Conv_0"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="Conv_0/kernel"):
        jaxinv.security(model, key=jax.random.key(0), params=params)
    bad = jaxinv.from_linen(zoo.make_cnn([(4, 3, 1, 0)], ["tanh", "identity"], num_classes=3), params)
    with pytest.raises(ValueError, match="non-finite"):
        jaxinv.security(bad, input_shape=(8, 8, 2), key=jax.random.key(0))


def test_bad_key_params_and_batched_grads():
    model = _tiny()
    with pytest.raises(TypeError, match="PRNG key"):
        jaxinv.security(model, key=0)
    with pytest.raises(ValueError, match="structure"):
        jaxinv.security(model, key=jax.random.key(0), params={"params": {}})
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 2))
    g = jax.vmap(lambda xi: jaxinv.client_gradient(model, xi[None], jnp.array([0])))(x)
    with pytest.raises(ValueError, match="shape"):
        jaxinv.security(model, key=jax.random.key(0), grads=g)


# -------------------------------------------------------------------------------------------------- CLI
def test_score_main(capsys, tmp_path):
    out = tmp_path / "r.json"
    assert jaxinv.cli.score_cmd(["test_security:tiny_factory", "--input-shape", "8,8,2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "COPA index" in printed and "verdict" in printed
    rep = json.loads(out.read_text())
    assert rep["input_shape"] == [8, 8, 2]
    assert jaxinv.cli.score_cmd(["test_security:tiny_factory", "--input-shape", "8,8,2", "--fail-under", "1000"]) == 1
    assert jaxinv.cli.score_cmd(["test_security:tiny_factory", "--input-shape", "8,8,2", "--metric", "copa",
                         "--fail-over", "-1"]) == (0 if rep["copa_index"] <= -1 else 1)
    assert jaxinv.cli.score_cmd(["no_such_model"]) == 2
    assert jaxinv.cli.score_cmd(["test_security:tiny_factory"]) == 2  # factory targets need --input-shape
    assert "input-shape" in capsys.readouterr().err


def test_layout_agnostic_nchw_matches_nhwc():
    """A plain from_fn model in NCHW/OIHW gives the same ranks as its NHWC/HWIO twin (same system, permuted)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    W = jax.random.uniform(k1, (2, 3, 3, 3), minval=-0.3, maxval=0.3)  # OIHW
    D = jax.random.uniform(k2, (32, 5), minval=-0.2, maxval=0.2)

    def apply(layout):
        def f(p, x):
            z = jax.lax.conv_general_dilated(x, p["w"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=layout)
            h = jnp.tanh(z)
            h = h if layout[0] == "NCHW" else h.transpose(0, 3, 1, 2)
            return h.reshape(h.shape[0], -1) @ p["d"] + p["b"]

        return f

    nchw = jaxinv.from_fn(apply(("NCHW", "OIHW", "NCHW")), {"w": W, "d": D, "b": jnp.zeros(5)}, input_shape=(3, 8, 8))
    nhwc = jaxinv.from_fn(apply(("NHWC", "HWIO", "NHWC")), {"w": W.transpose(2, 3, 1, 0), "d": D, "b": jnp.zeros(5)},
                          input_shape=(8, 8, 3))
    a, b = jaxinv.security(nchw, key=jax.random.key(1)), jaxinv.security(nhwc, key=jax.random.key(1))
    assert [r.rank for r in a.layers] == [r.rank for r in b.layers]
    assert a.copa_index == b.copa_index < 0
    assert "ker B0" in a.layers[0].method  # the structured path handles the NCHW layout


def test_security_runs_in_float64_with_the_same_ranks(x64):
    """A float64 model (x64 on): the metric's maps take float64 rows and cotangents (it raised a TypeError in the
    transposed forward map before), and the ranks equal the float32 analysis of the same weights."""
    m32 = _tiny(((4, 3, 2, 0),))  # more unknowns than outputs: the forward block is read through A^T
    p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), m32.params)
    m64 = jaxinv.from_fn(m32.apply_fn, p64, input_shape=(8, 8, 2))
    r64 = jaxinv.security(m64, key=jax.random.key(0))
    assert m64.structure().dtype == jnp.float64
    jax.config.update("jax_enable_x64", False)
    r32 = jaxinv.security(m32, key=jax.random.key(0))
    assert r64.deficiencies == r32.deficiencies
    assert [l.rank for l in r64.layers] == [l.rank for l in r32.layers]
    # underdetermined: the score is the lost energy of the probes, estimated in each precision (here 9.8 vs 11.2 dB)
    assert math.isfinite(r64.score) and abs(r64.score - r32.score) < 3.0, (r64.score, r32.score)


def test_the_pullback_counts_in_the_score_of_a_rank_deficient_chain():
    """A rank-deficient first convolution (4x4 stride 2 on 16x16: 132 lost directions): the systems' score models
    COPA's minimum-norm solve (13 dB), but COPA with the pull-back constraints recovers much more on real photos
    (32.6 dB measured); the score is the best layer-wise attack's, so it rises toward it (22 dB measured) and does
    not pass it."""
    model = tiny_cnn([(6, 4, 2, 1), (6, 3, 1, 1)], ["tanh"] * 2 + ["identity"], classes=4)
    rep = jaxinv.security(model, key=jax.random.key(0))
    assert rep.deficiencies[0] > 0
    x = jnp.stack([data.load_photo(p, size=16) for p in ("hubble_deep_field", "retina", "motorcycle")])
    g = jax.vmap(lambda xi: jaxinv.client_gradient(model, xi[None], jnp.zeros((1,), jnp.int32)))(x)
    rec = jaxinv.copa(model, g, label=jnp.zeros(3, jnp.int32), refine=True)
    pullback = float(np.mean([psnr(rec.image[i], x[i]) for i in range(3)]))
    assert rep.score_exact + 5 < rep.score < pullback + 3, (rep.score_exact, rep.score, pullback)

"""jaxinv.audit and the ``jaxinv audit`` / ``jaxinv attack`` commands: results scored against the truth, clear errors."""

import dataclasses
import io
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import AUDIT_DEFAULTS, Progress, leaking_layer, load_target, step_options

import jaxinv
from jaxinv import cli, data, zoo
from jaxinv.attacks import check_options

SHAPE = (16, 16, 3)


# ---------------------------------------------------------------- factories for the MODEL argument (test_audit:...)
def tuple3_factory(key):
    """(module, variables, input_shape): no --input-shape needed."""
    module, variables = zoo.build("cnn2_c1", key=key, input_shape=SHAPE)
    return module, variables, SHAPE


def not_a_model():
    return 42


def raising_factory():
    raise RuntimeError("weights file missing")


class PoolNet(nn.Module):
    """LayerNorm of the input, before any weight layer: outside the layer-wise methods, fine for the optimisation
    attacks."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(4, (3, 3))(nn.LayerNorm()(x)))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def pool_factory(key):
    module = PoolNet()
    variables = module.init(key, jnp.zeros((1,) + SHAPE))
    return jaxinv.from_linen(module, variables, input_shape=SHAPE, strict=False, name="poolnet")


@pytest.fixture(scope="module")
def model():
    return load_target("cnn2_c1", SHAPE, 0)[0]


@pytest.fixture(scope="module")
def photos():
    return data.sample_images(2, size=16, key=jax.random.key(0))


# ---------------------------------------------------------------------------------------------- the library
def test_load_target_contract():
    m, shape = load_target("test_audit:tuple3_factory")
    assert shape == SHAPE and m.name == "test_audit:tuple3_factory" and m.default_input_shape == SHAPE
    m, shape = load_target("test_audit:pool_factory")
    assert m.name == "poolnet" and shape == SHAPE
    with pytest.raises(ValueError, match="returned int; a factory returns a jaxinv.Model"):
        load_target("test_audit:not_a_model", SHAPE)
    with pytest.raises(ValueError, match="raised RuntimeError: weights file missing"):
        load_target("test_audit:raising_factory")
    with pytest.raises(ValueError, match="cannot import 'no_such_pkg.models'"):
        load_target("no_such_pkg.models:make")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_target("test_audit:nope")
    with pytest.raises(ValueError, match="unknown model 'cnn99'"):
        load_target("cnn99")


def test_step_options():
    assert step_options(("copa", "ig", "hybrid", "dlg"), 50) == {
        "ig": {"max_steps": 50}, "hybrid": {"max_steps": (50, 25, 5)}, "dlg": {"max_steps": 50}}
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        step_options(("ig",), 0)


def test_audit_eager_errors(model, photos):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        jaxinv.audit(model, photos, attacks=("copa", "nope"), key=key)
    with pytest.raises(ValueError, match="attack_options has options for 'ig', which is not in attacks"):
        jaxinv.audit(model, photos, attacks=("copa",), key=key, attack_options={"ig": {"max_steps": 5}})
    with pytest.raises(TypeError, match="unknown option 'steps' for attack 'ig'"):
        jaxinv.audit(model, photos, attacks=("ig",), key=key, attack_options={"ig": {"steps": 5}})
    with pytest.raises(ValueError, match=r"images must have shape \(N, 16, 16, 3\)"):
        jaxinv.audit(model, photos[:, :8], attacks=("copa",), key=key)
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\]"):
        jaxinv.audit(model, photos * 255, attacks=("copa",), key=key)
    with pytest.raises(ValueError, match="out of range"):
        jaxinv.audit(model, photos, labels=np.array([0, 10]), attacks=("copa",), key=key)
    with pytest.raises(TypeError, match="key must be a JAX PRNG key"):
        jaxinv.audit(model, photos, attacks=("copa",), key=0)
    with pytest.raises(TypeError, match="model must be a jaxinv.Model"):
        jaxinv.audit("cnn2_c1", photos, attacks=("copa",), key=key)


def test_audit_scores_against_truth(model, photos, tmp_path):
    calls = []
    res = jaxinv.audit(model, photos, labels=np.array([1, 4]), attacks="copa", key=jax.random.key(0),
                       progress=lambda i, n, s: calls.append((i, n, s)))
    assert [c[0] for c in calls] == [0, 1, 2, 3] and calls[-1] == (3, 3, "done")
    assert res.model == "cnn2_c1" and res.input_shape == SHAPE and res.dtype == "float32"
    assert res.security.verdict.startswith("LEAKS") and res.leaking_layer.determined
    assert res.leaking_layer.path == res.security.layers[0].path
    for name in ("copa",):
        a = res[name]
        assert a.ok and a.images.shape == (2,) + SHAPE and a.label_accuracy == 1.0
        assert np.all(a.psnr > 60) and np.all(a.ssim > 0.99) and np.all(a.gradient_distance < 1e-3)
        # the psnr is the truth's: recompute from the stored images
        mse = np.mean((np.clip(a.images, 0, 1) - res.truth) ** 2, axis=(1, 2, 3))
        np.testing.assert_allclose(a.psnr, -10 * np.log10(mse), rtol=1e-3)
        assert [r.path for r in a.layers] == [r.path for r in res.security.layers]
        assert all(r.status == 0 for r in a.layers) and a.layers[0].gradient_residual < 1e-3
        assert math.isnan(a.layers[-1].forward_residual)  # the head has no forward rows
    with pytest.raises(KeyError, match="no attack 'ig'"):
        res["ig"]
    text = res.table()
    assert "leaking layer" in text and "copa" in text
    paths = res.save(tmp_path / "out")
    d = json.loads(open(paths["json"]).read())
    assert d["attacks"]["copa"]["label_accuracy"] == 1.0 and d["labels"] == [1, 4]
    assert d["security"]["copa_index"] == 0 and d["leaking_layer"]["index"] == 0
    assert len(d["attacks"]["copa"]["psnr"]) == 2 and d["best_psnr"] > 60
    assert {"html", "json", "truth", "copa"} <= set(paths)


def test_leaking_layer_picks_the_most_lossy_deficient_layer(model):
    rep = jaxinv.security(model, key=jax.random.key(0))
    l0, l1 = rep.layers
    hidden = [dataclasses.replace(l0, deficiency=10, lost_energy=0.05),
              dataclasses.replace(l0, index=1, path="B/kernel", deficiency=3, lost_energy=0.3)]
    head = dataclasses.replace(l1, index=2)
    leak = leaking_layer(dataclasses.replace(rep, layers=(*hidden, head)))
    assert (leak.path, leak.index, leak.determined) == ("B/kernel", 1, False)
    assert "30%" in leak.text and "layers below receive corrupted targets" in leak.text


def test_audit_unsupported_model_still_runs_optimisation_attacks(photos):
    model, _ = load_target("test_audit:pool_factory")
    res = jaxinv.audit(model, photos[:1], attacks=("copa", "ig"), key=jax.random.key(0),
                       attack_options={"ig": {"max_steps": 5}})
    assert res.security is None and "UnsupportedModelError" in res.security_error
    assert not res["copa"].ok and res["copa"].images is None and "copa" in res.table()
    assert res["ig"].ok and res["ig"].images.shape == (1,) + SHAPE
    assert res["ig"].labels_given and math.isnan(res["ig"].label_accuracy)  # unreadable head: labels given
    assert "given" in res.table()
    d = res.to_dict()
    assert d["security"] is None and d["attacks"]["copa"]["error"]
    json.dumps(d)  # JSON-able


# -------------------------------------------------------------------------------------------- the commands
def _one_line_error(capsys, argv, *match):
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    for m in match:
        assert m in err[0], err[0]
    return err[0]


def test_cli_bad_input_one_line_exit_2(capsys, tmp_path):
    _one_line_error(capsys, ["audit", "cnn2_c1", "--images", str(tmp_path / "missing")], "--images", "does not exist")
    _one_line_error(capsys, ["audit", "no_such_pkg.models:make"], "MODEL", "cannot import 'no_such_pkg.models'")
    _one_line_error(capsys, ["audit", "test_audit:not_a_model", "--input-shape", "16,16,3"], "MODEL",
                    "returned int")
    _one_line_error(capsys, ["audit", "cnn2_c1", "--attacks", "copa,frobnicate"], "--attacks",
                    "unknown attack 'frobnicate'")
    _one_line_error(capsys, ["audit", "cnn2_c1", "--n", "0"], "--n must be a positive integer")
    _one_line_error(capsys, ["audit", "cnn2_c1", "--n", "two"], "--n", "invalid int value")
    _one_line_error(capsys, ["audit", "cnn2_c1", "--attacks", "ig", "--option", "ig.stepz=3"], "--option",
                    "unknown option 'stepz'")
    _one_line_error(capsys, ["audit", "cnn2_c1", "--option", "dlg.max_steps=3"], "--option", "ATTACK one of")
    _one_line_error(capsys, ["audit", "cnn2_c1", "--input-shape", "16,x"], "--input-shape")
    _one_line_error(capsys, ["audit", "cnn2_c1", "--steps", "0"], "--steps must be a positive integer")
    _one_line_error(capsys, ["audit", "cnn2_c1", "--images", "tfds:"], "--images", "give a dataset")
    _one_line_error(capsys, ["attack", "frobnicate", "cnn2_c1"], "NAME", "unknown attack 'frobnicate'")
    _one_line_error(capsys, ["attack", "copa", "test_audit:raising_factory"], "weights file missing")
    _one_line_error(capsys, ["audit"], "MODEL")  # missing argument


def test_cli_help_documents_the_contract(capsys):
    assert cli.main(["audit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "package.module:factory" in out and "(linen module, variables, input_shape)" in out
    assert "exit status: 0 ok; 1" in out
    assert cli.main([]) == 0 and "audit" in capsys.readouterr().out


def test_cli_audit_writes_report_and_json(capsys, tmp_path):
    out = tmp_path / "rep"
    rc = cli.main(["audit", "test_audit:tuple3_factory", "--n", "2", "--attacks", "copa,ig", "--steps", "20",
                   "--out", str(out), "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    d = json.loads(cap.out)  # stdout is the metrics JSON only
    assert d == json.loads((out / "metrics.json").read_text())
    assert d["model"] == "test_audit:tuple3_factory" and d["n_images"] == 2 and d["source"].startswith("bundled")
    assert d["attacks"]["ig"]["options"]["max_steps"] == 20 and min(d["attacks"]["copa"]["psnr"]) > 60
    page = (out / "report.html").read_text()
    assert 'id="grid-copa"' in page and 'id="grid-ig"' in page and "http" not in page
    for f in ("truth.png", "recon_copa.png", "recon_ig.png"):
        assert (out / f).read_bytes()[:4] == b"\x89PNG"
    assert "\r" not in cap.err  # no progress line when stderr is not a terminal


def test_cli_attack_grid_json_and_gate(capsys, tmp_path):
    out = tmp_path / "att"
    rc = cli.main(["attack", "rgap", "cnn2_c1", "--input-shape", "16,16,3", "--n", "2", "--out", str(out),
                   "--fail-over", "40", "--option", "max_steps=500"])
    cap = capsys.readouterr()
    assert rc == 1 and "FAIL: rgap mean PSNR" in cap.err  # R-GAP inverts cnn2_c1: the privacy gate fails
    assert "PSNR" in cap.out
    d = json.loads((out / "attack_rgap.json").read_text())
    assert d["attack"] == "rgap" and d["label_accuracy"] == 1.0 and len(d["true_labels"]) == 2
    assert d["options"] == {"max_steps": 500} and min(d["psnr"]) > 60
    png = (out / "attack_rgap.png").read_bytes()
    assert png[:4] == b"\x89PNG"


def test_progress_line(monkeypatch):
    buf = io.StringIO()
    p = Progress(enabled=True, stream=buf)
    p(0, 2, "security analysis")
    p(2, 2, "done")
    assert "1/2 security analysis" in buf.getvalue() and buf.getvalue().endswith("2/2 done\n")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("CI", "true")
    assert not Progress(stream=Tty()).enabled
    monkeypatch.delenv("CI")
    assert Progress(stream=Tty()).enabled
    assert not Progress(stream=io.StringIO()).enabled


def test_audit_defaults_are_valid_options():
    for name, opts in AUDIT_DEFAULTS.items():
        check_options(name, opts)


def test_audit_client_setting(model, photos):
    """The client's setting (jaxinv.Client) makes the shared objects, and the attacks and the metric assume it."""
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="batch_size=2.*single-image"):
        jaxinv.audit(model, photos, attacks=("copa",), key=key, client=jaxinv.Client(batch_size=2))
    with pytest.raises(TypeError, match="client must be a jaxinv.Client"):
        jaxinv.audit(model, photos, attacks=("copa",), key=key, client={"local_steps": 2})
    fed = jaxinv.Client(local_steps=2, local_lr=0.01)
    res = jaxinv.audit(model, photos, labels=np.array([1, 4]), attacks=("copa",), key=key, client=fed)
    a = res["copa"]
    assert a.options["local_steps"] == 2 and a.options["local_lr"] == 0.01
    assert a.ok and np.all(a.psnr > 40), a.psnr  # the FedAvg update, inverted with the client's steps
    assert res.security.defence.startswith("fedavg(K=2")  # the metric accounts for the client's steps

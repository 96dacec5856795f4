"""jaxinv.sweep: one JSONL row per (model, defence, attack, image), resumable, local and on a Ray cluster."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from helpers import zoo_model

import jaxinv
from jaxinv import data


def _noise(grads, key):
    """A Gaussian-noise defence (sigma 1e-2) on one client's gradient."""
    leaves, tdef = jax.tree_util.tree_flatten(grads)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        tdef, [g + 1e-2 * jax.random.normal(k, g.shape, g.dtype) for g, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def fcn():
    return zoo_model("fcn3", seed=1)


def _grid(fcn, out, **kw):
    calls = []
    rows = jaxinv.sweep({"cnn2_c1": "cnn2_c1", "fcn3": fcn}, 3, out=out, key=jax.random.key(0),
                        attacks=("copa",), defences={"none": None, "noise": _noise}, chunk=2,
                        progress=lambda i, n, t: calls.append(t), **kw)
    return rows, calls


@pytest.mark.slow
def test_sweep_rows_resume_and_torn_file(fcn, tmp_path):
    out = tmp_path / "sweep.jsonl"
    rows, calls = _grid(fcn, out)
    # 2 models x 2 defences x (1 security + 3 images)
    assert len(rows) == 16 and len(calls) == 2 * (2 + 2 * 2)
    with open(out) as f:
        assert [json.loads(line) for line in f] == rows
    sec = {(r["model"], r["defence"]): r for r in rows if r["kind"] == "security"}
    assert sec["cnn2_c1", "none"]["error"] is None and sec["cnn2_c1", "none"]["copa_index"] == 0
    assert sec["cnn2_c1", "none"]["score"] > 60 and sec["cnn2_c1", "noise"]["score"] < sec["cnn2_c1", "none"]["score"]
    att = [r for r in rows if r["kind"] == "attack"]
    assert sorted({r["image"] for r in att}) == [0, 1, 2]
    # every reconstruction is scored against its true image: exact without a defence, worse under noise
    clean = [r["psnr"] for r in att if r["defence"] == "none"]
    noisy = [r["psnr"] for r in att if r["defence"] == "noise"]
    assert all(r["error"] is None for r in att)
    assert min(clean) > 60, clean
    assert max(noisy) < min(clean) - 20, (noisy, clean)
    # labels: random per model from the key, recovered by the attack from the head
    assert all(r["label_recovered"] == r["label"] for r in att if r["defence"] == "none")

    # resume: nothing to run, same rows
    again, calls = _grid(fcn, out)
    assert again == rows and calls == []

    # an interrupted write (torn last line) and lost rows: cut off, and only the missing task runs again
    lines = out.read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if not (json.loads(ln)["model"] == "fcn3" and json.loads(ln)["defence"] == "noise"
                                       and json.loads(ln).get("image") == 2)]
    out.write_text("".join(keep) + lines[-1][:25])
    again, calls = _grid(fcn, out)
    assert len(calls) == 1 and calls[0]["model"] == "fcn3" and calls[0]["images"] == [2]
    assert len(again) == 16
    fixed = {(r["model"], r["defence"], r["image"]): r["psnr"] for r in again if r["kind"] == "attack"}
    first = {(r["model"], r["defence"], r["image"]): r["psnr"] for r in rows if r["kind"] == "attack"}
    assert fixed.keys() == first.keys()
    # the re-run chunk pads the lone image to the chunk size: same key and targets, same answer
    assert fixed[("fcn3", "noise", 2)] == pytest.approx(first[("fcn3", "noise", 2)], abs=0.5)
    for line in out.read_text().splitlines():
        json.loads(line)

    # other options are other runs; resume=False starts afresh
    fresh = jaxinv.sweep({"fcn3": fcn}, 2, out=out, key=jax.random.key(0), security=False, resume=False,
                         attacks=("copa",), attack_options={"copa": {"max_steps": 50}})
    assert len(fresh) == 2 and len(out.read_text().splitlines()) == 2
    assert fresh[0]["options"] == {"max_steps": 50}


def test_sweep_images_array_and_grey_model(tmp_path):
    """Given images are fitted to each model's input (here RGB 32x32 photos for a 1-channel 28x28 LeNet)."""
    photos = data.sample_images(2, size=32, key=jax.random.key(3))
    rows = jaxinv.sweep(["lenet_dlg"], photos, labels=[1, 2], out=tmp_path / "s.jsonl", key=jax.random.key(0),
                        attacks=("copa",), security=False)
    assert [r["label"] for r in rows] == [1, 2]
    assert all(r["error"] is None and r["psnr"] > 40 for r in rows), rows


def test_sweep_execution_and_client_objects(fcn, tmp_path):
    """``execution=`` and ``client=`` objects; a client other than the default is part of each row's identity."""
    out = tmp_path / "s.jsonl"
    kw = dict(out=out, key=jax.random.key(0), attacks=("copa",), security=False)
    rows = jaxinv.sweep({"fcn3": fcn}, 2, execution=jaxinv.Execution(chunk=1, resume=False), **kw)
    assert [r["image"] for r in rows] == [0, 1] and all(r["psnr"] > 60 for r in rows), rows
    with pytest.raises(ValueError, match=r"models\['fcn3'\]: loss='cross_entropy' on a model with one output"):
        jaxinv.sweep({"fcn3": fcn}, 2, client=jaxinv.Client(loss="cross_entropy"), **kw)
    again = jaxinv.sweep({"fcn3": fcn}, 2, chunk=2, client=jaxinv.Client(loss="logistic"), **kw)
    assert len(again) == 2 and len(out.read_text().splitlines()) == 4  # other runs: the options say the loss
    assert all(r["options"] == {"loss": "logistic"} and r["psnr"] > 60 for r in again), again


def test_sweep_bad_input(fcn, tmp_path):
    out = tmp_path / "s.jsonl"
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="backend"):
        jaxinv.sweep([fcn], 1, out=out, key=key, backend="spark")
    with pytest.raises(TypeError, match=r"defences\['bad'\]"):
        jaxinv.sweep([fcn], 1, out=out, key=key, defences={"bad": 3})
    with pytest.raises(TypeError, match="models"):
        jaxinv.sweep([3.0], 1, out=out, key=key)
    with pytest.raises(ValueError, match=r"models\['nope'\].*unknown model"):
        jaxinv.sweep(["nope"], 1, out=out, key=key)
    with pytest.raises(ValueError, match="one entry per image"):
        jaxinv.sweep([fcn], 2, labels=[1], out=out, key=key)
    with pytest.raises(ValueError, match="labels.*range|out of range|labels"):
        jaxinv.sweep([fcn], 1, labels=[99], out=out, key=key, security=False)
    with pytest.raises(ValueError, match="unknown attack"):
        jaxinv.sweep([fcn], 1, out=out, key=key, attacks=("fgsm",))
    with pytest.raises(TypeError, match="unknown option"):
        jaxinv.sweep([fcn], 1, out=out, key=key, attack_options={"copa": {"nope": 1}})
    with pytest.raises(ValueError, match="backend"):
        jaxinv.Execution(backend="spark")
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        jaxinv.sweep([fcn], 1, out=out, key=key, chunk=0)
    with pytest.raises(TypeError, match="chunk given both"):
        jaxinv.sweep([fcn], 1, out=out, key=key, execution=jaxinv.Execution(chunk=2), chunk=3)
    with pytest.raises(TypeError, match="unexpected keyword argument.*chunks"):
        jaxinv.sweep([fcn], 1, out=out, key=key, chunks=2)
    with pytest.raises(ValueError, match="batch_size=2"):
        jaxinv.sweep([fcn], 1, out=out, key=key, client=jaxinv.Client(batch_size=2))
    assert not out.exists() or out.read_text() == ""


RAY_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, ray
    from ray.cluster_utils import Cluster
    import jaxinv
    from jaxinv import zoo

    # a two-node cluster on loopback: the head and one worker node, one CPU each
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        module, variables = zoo.build("fcn3", key=jax.random.key(1))
        fcn = jaxinv.from_linen(module, variables, input_shape=zoo.input_shape("fcn3"), name="fcn3")
        kw = dict(key=jax.random.key(0), attacks=("copa",), chunk=1)
        rows = jaxinv.sweep({"cnn2_c1": "cnn2_c1", "fcn3": fcn}, 2, out=sys.argv[1], backend="ray", **kw)
    finally:
        ray.shutdown()
        cluster.shutdown()
    local = jaxinv.sweep({"cnn2_c1": "cnn2_c1", "fcn3": fcn}, 2, out=sys.argv[2], backend="local", **kw)
    print("RESULT " + json.dumps({"ray": rows, "local": local}))
""")


@pytest.mark.slow
def test_sweep_on_a_ray_cluster(tmp_path):
    if os.environ.get("JAXINV_REQUIRE_RAY") != "1":
        pytest.importorskip("ray")
    script = tmp_path / "ray_sweep.py"
    script.write_text(RAY_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "ray.jsonl"), str(tmp_path / "local.jsonl")],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    ray_rows, local = res["ray"], res["local"]
    assert len(ray_rows) == len(local) == 2 * (1 + 2)
    assert {r["backend"] for r in ray_rows} == {"ray"}
    # tasks ran on the cluster's nodes (the driver process has no node id in its rows)
    assert all(r.get("node") for r in ray_rows)
    key = lambda r: (r["kind"], r["model"], r["image"])  # noqa: E731
    by = {key(r): r for r in local}
    for r in ray_rows:
        l = by[key(r)]
        assert r["error"] is None and l["error"] is None
        if r["kind"] == "attack":
            assert r["label"] == l["label"] and r["psnr"] > 60
            assert r["psnr"] == pytest.approx(l["psnr"], abs=1.0)
        else:
            assert r["score"] == pytest.approx(l["score"], abs=1e-6)

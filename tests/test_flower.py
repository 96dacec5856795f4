"""jaxinv.flower.AuditStrategy in a real Flower simulation: 2 clients, 2 rounds, a Flax model, bundled photos."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from helpers import zoo_model

import jaxinv

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import flwr
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation
    import jaxinv
    from jaxinv import data, zoo
    from jaxinv.flower import AuditStrategy, arrays_to_params, params_to_arrays

    OUT, LR = sys.argv[1], 0.1

    def build():
        module, variables = zoo.build("cnn2_c1", key=jax.random.key(0))
        return jaxinv.from_linen(module, variables, input_shape=(32, 32, 3), name="cnn2_c1")

    def client_data(cid):  # each client holds one bundled photo
        x = data.sample_images(2, key=jax.random.key(7))[cid][None]
        return x, jnp.array([3 + 4 * cid])

    class Client(NumPyClient):
        def __init__(self, cid):
            self.cid, self.model = cid, build()

        def fit(self, parameters, config):  # one local SGD step on the client's image
            params = arrays_to_params(parameters, self.model.params)
            model = jaxinv.Model(self.model.apply_fn, params, name="cnn2_c1", input_shape=(32, 32, 3))
            x, y = client_data(self.cid)
            upd = jaxinv.local_update(model, x, y, steps=1, lr=LR)
            new = jax.tree_util.tree_map(lambda a, d: a + d, params, upd)
            return params_to_arrays(new), 1, {"cid": self.cid}

        def evaluate(self, parameters, config):
            return 0.0, 1, {}

    def client_fn(context):
        return Client(int(context.node_config["partition-id"])).to_client()

    holder = {}

    def server_fn(context):
        model = build()
        fedavg = FedAvg(initial_parameters=ndarrays_to_parameters(params_to_arrays(model.params)),
                        fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2)
        strategy = AuditStrategy(fedavg, model, out_dir=OUT, key=jax.random.key(0), local_steps=1, local_lr=LR,
                                 truth=lambda rnd, cid, m: client_data(int(cid)))
        holder["s"] = strategy
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=2))

    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=2, backend_config={"client_resources": {"num_cpus": 1}})
    print("REPORTS " + json.dumps(holder["s"].reports))
''')


@pytest.mark.slow
def test_flower_simulation_audits_every_client_every_round(tmp_path):
    if os.environ.get("JAXINV_REQUIRE_RAY") != "1":
        pytest.importorskip("flwr")
        pytest.importorskip("ray")
    script = tmp_path / "fl.py"
    script.write_text(SCRIPT)
    out = tmp_path / "audit"
    r = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0"})
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    reports = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("REPORTS "))[len("REPORTS "):])
    assert [rep["round"] for rep in reports] == [1, 2]
    for rep in reports:
        on_disk = json.loads((out / f"round_{rep['round']:03d}.json").read_text())
        assert on_disk == rep
        assert (out / f"round_{rep['round']:03d}_copa.png").stat().st_size > 1000
        assert rep["security"]["score"] > 60  # one local step: the update is the gradient, cnn2_c1 leaks
        assert sorted(c["client"] for c in rep["clients"]) == ["0", "1"]
        for c in rep["clients"]:
            a = c["attacks"]["copa"]
            assert a["error"] is None
            assert a["labels"] == c["true_labels"] == [3 + 4 * int(c["client"])]
            assert a["psnr"][0] > 60, a  # the honest-but-curious server reconstructs the client's photo
            assert a["gradient_distance"][0] < 1e-3


def test_arrays_round_trip_and_errors():
    pytest.importorskip("flwr")
    from jaxinv.flower import arrays_to_params, params_to_arrays  # needs flwr

    params = {"a": {"kernel": np.ones((2, 3), np.float32)}, "b": np.zeros(4, np.float32)}
    back = arrays_to_params(params_to_arrays(params), params)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    with pytest.raises(ValueError, match="a/kernel has shape"):
        arrays_to_params([np.ones((3, 2)), np.zeros(4)], params)
    with pytest.raises(ValueError, match="1 arrays for a model with 2"):
        arrays_to_params([np.zeros(4)], params)


def test_audit_strategy_takes_the_client_setting(tmp_path):
    """``client=jaxinv.Client(...)`` or its fields as keywords, validated once; the attacks assume the setting."""
    pytest.importorskip("flwr")
    from flwr.server.strategy import FedAvg

    from jaxinv.flower import AuditStrategy  # needs flwr

    model = zoo_model("fcn3")
    kw = dict(out_dir=tmp_path, key=jax.random.key(0))
    s = AuditStrategy(FedAvg(), model, local_steps=2, local_lr=0.1, **kw)
    assert s.client == jaxinv.Client(local_steps=2, local_lr=0.1) and (s.local_steps, s.local_lr) == (2, 0.1)
    assert s.attack_options == {"copa": {"local_steps": 2, "local_lr": 0.1}}
    s = AuditStrategy(FedAvg(), model, client=jaxinv.Client(local_lr=0.1), attack_options={"copa": {"max_steps": 9}},
                      **kw)
    assert (s.local_steps, s.local_lr) == (1, 0.1) and s.attack_options == {"copa": {"max_steps": 9}}
    with pytest.raises(ValueError, match="local_lr"):
        AuditStrategy(FedAvg(), model, **kw)  # weights shared: the learning rate reads the update
    assert AuditStrategy(FedAvg(), model, shares="gradient", **kw).local_lr is None
    with pytest.raises(ValueError, match="local_steps must be a positive integer"):
        AuditStrategy(FedAvg(), model, local_steps=0, local_lr=0.1, **kw)
    with pytest.raises(TypeError, match="local_steps given both"):
        AuditStrategy(FedAvg(), model, client=jaxinv.Client(local_steps=2, local_lr=0.1), local_steps=3, **kw)
    with pytest.raises(ValueError, match="shares='gradient'"):
        AuditStrategy(FedAvg(), model, shares="gradient", local_steps=2, local_lr=0.1, **kw)
    with pytest.raises(TypeError, match="unexpected keyword argument.*local_step"):
        AuditStrategy(FedAvg(), model, local_lr=0.1, local_step=2, **kw)
    with pytest.raises(ValueError, match="unknown attack"):
        AuditStrategy(FedAvg(), model, local_lr=0.1, attacks=("fgsm",), **kw)

r"""Flower adapter: audit every client's update on the server, every round (honest-but-curious server).

:class:`AuditStrategy` wraps any Flower strategy (``flwr.server.strategy.Strategy``, e.g. ``FedAvg``) and behaves
exactly like it, except that in ``aggregate_fit`` it first turns each client's result into the shared gradient
and attacks it, as a curious server could:

* the weights it sent in ``configure_fit`` are :math:`\theta_0`; a client returning new weights :math:`\theta_K`
  after ``local_steps`` :math:`K` SGD steps with learning rate ``local_lr`` :math:`\eta` shared
  :math:`\Delta = \theta_K - \theta_0`, read as the gradient :math:`-\Delta/(K\eta)`
  (:func:`jaxinv.update_as_gradient`); ``shares="gradient"`` clients send the gradient itself;
* the attacks (default ``copa``) run on it at :math:`\theta_0` (``jaxinv.Model`` with the round's weights, same
  compiled solvers every round); the round's :func:`jaxinv.security` report accounts for the :math:`K` steps;
* ``out_dir/round_NNN.json`` gets, per client, the recovered label, the truth-free gradient distance, the per-layer
  residuals and (when ``truth`` knows the client's data, in simulations) PSNR/SSIM against its images;
  ``out_dir/round_NNN_<attack>.png`` the reconstructions (the true images on top when known).

Needs Flower: ``pip install 'jaxinv[flower]'`` (``flwr[simulation]``, whose simulation engine runs on Ray).

Example:
    >>> from flwr.server.strategy import FedAvg
    >>> strategy = jaxinv.flower.AuditStrategy(FedAvg(), model, out_dir="audit", key=jax.random.key(0),
    ...                                        client=jaxinv.Client(local_steps=1, local_lr=0.1))
    >>> strategy.attacks, strategy.client.fedavg
    (('copa',), False)
    >>> # ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=3)) in the ServerApp
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._audit import check_attacks, check_client, client_keywords, error_text, image_scores, jsonable, layer_residuals
from ._audit import merged_options
from ._checks import check_key, merge_options, no_more_keywords
from ._client import Client
from ._fedavg import update_as_gradient
from ._model import Model, param_paths
from ._security import security as security_report
from .attacks import attack
from .report import slug, write_grid

try:
    from flwr.common import parameters_to_ndarrays
    from flwr.server.strategy import Strategy
except ImportError as _e:  # pragma: no cover - exercised without the extra
    raise ImportError("jaxinv.flower needs Flower: pip install 'jaxinv[flower]'") from _e

__all__ = ["AuditStrategy", "arrays_to_params", "params_to_arrays"]


def params_to_arrays(params: Any) -> list[np.ndarray]:
    """A parameter pytree as the list of NumPy arrays Flower sends (``jax.tree_util`` leaf order)."""
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(params)]


def arrays_to_params(arrays: Sequence[np.ndarray], like: Any, *, where: str = "arrays") -> Any:
    """Flower's list of arrays back into a pytree shaped like ``like``; a clear error names the first mismatch."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    paths = param_paths(like)
    if len(arrays) != len(leaves):
        raise ValueError(f"{where}: {len(arrays)} arrays for a model with {len(leaves)} parameters "
                         f"({', '.join(paths)}): the client must send every parameter, in jax.tree_util order")
    for a, l, p in zip(arrays, leaves, paths):
        if tuple(np.shape(a)) != tuple(np.shape(l)):
            raise ValueError(f"{where}: parameter {p} has shape {tuple(np.shape(a))}, the model's is "
                             f"{tuple(np.shape(l))}")
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a, jnp.result_type(l)) for a, l in zip(arrays, leaves)])


class AuditStrategy(Strategy):
    r"""A Flower strategy that audits every client's update before the wrapped strategy aggregates it.

    Args:
        strategy: the Flower strategy to wrap (it does all the federated work).
        model: the :class:`jaxinv.Model` the clients train (its parameters' structure; the round's weights replace
            them).
        out_dir: where the per-round reports go.
        key: JAX PRNG key (the attacks' random starts, the security probes).
        client: the clients' setting (:class:`jaxinv.Client`): with ``shares="weights"`` (clients return new weights)
            ``local_steps`` :math:`K` and ``local_lr`` :math:`\eta` (required) read each update as the gradient
            :math:`-\Delta/(K\eta)`; the security report and the attacks assume the whole setting (loss, batch size,
            local steps). Its fields are also accepted as keywords (``local_steps=1, local_lr=0.1``).
        shares: ``"weights"``, or ``"gradient"`` when clients send gradients instead of weights (then
            ``local_steps`` must be 1).
        attacks: attacks from :data:`jaxinv.ATTACKS` run on each update; ``attack_options``: their options (over
            the client's setting).
        truth: optional ``truth(server_round, client_id, fit_metrics) -> (images, labels) | None``: the client's data
            when the experimenter knows it (simulations), to score the reconstructions.
        client_id: ``client_id(client_proxy, fit_res) -> str`` (default: ``fit_res.metrics["cid"]`` if the client
            sends it, else the proxy's ``cid``).
        security: also write the round's :func:`jaxinv.security` report (accounting for ``local_steps``).

    Attributes:
        reports: the per-round reports (dicts, also written as JSON).
    """

    def __init__(self, strategy: Strategy, model: Model, *, out_dir: str | os.PathLike[str], key: Any,
                 client: Client | None = None, shares: str = "weights", attacks: Sequence[str] = ("copa",),
                 attack_options: dict[str, dict] | None = None, truth: Callable[[int, str, dict], Any] | None = None,
                 client_id: Callable[[Any, Any], str] | None = None, security: bool = True, **kwargs: Any):
        client = merge_options(client, Client, kwargs, "AuditStrategy")
        no_more_keywords(kwargs, "AuditStrategy", "its own and the fields of jaxinv.Client (loss, batch_size, "
                                                  "local_steps, local_lr)")
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a flwr.server.strategy.Strategy (e.g. FedAvg), got "
                            f"{type(strategy).__name__}")
        if not isinstance(model, Model):
            raise TypeError(f"model must be a jaxinv.Model (from_linen / from_nnx / from_fn), got {type(model).__name__}")
        if shares not in ("weights", "gradient"):
            raise ValueError(f"shares must be 'weights' (clients return new weights) or 'gradient', got {shares!r}")
        client = check_client(client, "AuditStrategy", batches=True)
        if shares == "weights" and client.local_lr is None:
            raise ValueError("AuditStrategy: local_lr (the clients' learning rate) is required with shares='weights': "
                             "each update is read as the gradient -update / (local_steps * local_lr)")
        if shares == "gradient" and client.fedavg:
            raise ValueError(f"AuditStrategy: shares='gradient' (clients send their gradient) with local_steps="
                             f"{client.local_steps}: use shares='weights' for FedAvg updates")
        self.strategy, self.model, self.out_dir = strategy, model, os.fspath(out_dir)
        self.key = check_key(key, "AuditStrategy", required=True)
        self.client, self.shares = client, shares
        self.local_steps, self.local_lr = client.local_steps, client.local_lr
        self.attacks = check_attacks(attacks)
        self.attack_options = merged_options(self.attacks, attack_options, client, defaults={})
        self.truth, self.client_id, self.security = truth, client_id, bool(security)
        self.reports: list[dict] = []
        self._sent: dict[int, list[np.ndarray]] = {}

    def __repr__(self) -> str:
        return f"AuditStrategy({self.strategy!r}, attacks={self.attacks})"

    # ---------------------------------------------------------------------------- delegated strategy methods
    def initialize_parameters(self, client_manager):
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        self._sent[server_round] = parameters_to_ndarrays(parameters)
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        self.audit_round(server_round, results)
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.strategy.evaluate(server_round, parameters)

    # ---------------------------------------------------------------------------------------------- the audit
    def _cid(self, proxy, res) -> str:
        if self.client_id is not None:
            return str(self.client_id(proxy, res))
        m = getattr(res, "metrics", None) or {}
        return str(m["cid"]) if "cid" in m else str(getattr(proxy, "cid", "?"))

    def audit_round(self, server_round: int, results: Sequence[tuple[Any, Any]]) -> dict:
        """Attack every client's result of this round and write the round's report (also in :attr:`reports`)."""
        t0 = time.perf_counter()
        sent = self._sent.get(server_round)
        if sent is None:
            raise RuntimeError(f"AuditStrategy: round {server_round} was not configured through configure_fit")
        theta0 = arrays_to_params(sent, self.model.params, where=f"round {server_round}: the server's weights")
        model = eqx.tree_at(lambda m: m.params, self.model, theta0)  # same static parts: compiled solvers reused
        key = jax.random.fold_in(self.key, server_round)
        rnd: dict = {"round": server_round, "local_steps": self.local_steps, "local_lr": self.local_lr,
                     "shares": self.shares, "clients": []}
        if self.security:
            try:
                fed = ({"local_steps": self.local_steps, "local_lr": self.local_lr} if self.shares == "weights"
                       else {})  # weights shared: even one step carries the rounding of theta_0 - lr g
                rep = security_report(model, key=key, **{**client_keywords(self.client), **fed})
                rnd["security"] = {"score": rep.score, "verdict": rep.verdict, "copa_index": rep.copa_index,
                                   "score_undefended": rep.score_undefended}
            except ValueError as e:
                rnd["security"] = {"error": str(e).splitlines()[0]}
        os.makedirs(self.out_dir, exist_ok=True)
        grids: dict[str, list] = {a: [] for a in self.attacks}
        truths: list = []
        for i, (proxy, res) in enumerate(results):
            cid = self._cid(proxy, res)
            where = f"round {server_round}, client {cid}"
            arrays = parameters_to_ndarrays(res.parameters)
            shared = arrays_to_params(arrays, self.model.params, where=where)
            if self.shares == "weights":
                grads = update_as_gradient(jax.tree_util.tree_map(lambda a, b: a - b, shared, theta0),
                                           steps=self.local_steps, lr=self.local_lr)
            else:
                grads = shared
            known = self.truth(server_round, cid, dict(getattr(res, "metrics", None) or {})) if self.truth else None
            entry: dict = {"client": cid, "num_examples": int(getattr(res, "num_examples", 0) or 0), "attacks": {}}
            if known is not None:
                tx, ty = jnp.asarray(known[0]), np.asarray(known[1]).reshape(-1)
                entry["true_labels"] = ty.tolist()
                truths.append(tx)
            for a in self.attacks:
                t1 = time.perf_counter()
                try:
                    rec = attack(a, model, grads, key=jax.random.fold_in(key, i), **self.attack_options[a])
                    jax.block_until_ready(rec.image)
                except ValueError as e:
                    entry["attacks"][a] = {"error": error_text(e)}
                    continue
                r = {"labels": np.asarray(rec.label).reshape(-1).tolist(),
                     "gradient_distance": np.asarray(rec.gradient_distance).reshape(-1).tolist(),
                     "seconds": time.perf_counter() - t1, "error": None,
                     "layers": [lr.to_dict() for lr in layer_residuals(rec)]}
                if known is not None and rec.image.shape == tx.shape:
                    p, s = image_scores(rec.image, tx.astype(rec.image.dtype))
                    r["psnr"], r["ssim"] = p.tolist(), s.tolist()
                entry["attacks"][a] = r
                grids[a].append(np.clip(np.asarray(rec.image, np.float32), 0, 1))
            rnd["clients"].append(entry)
        rnd["seconds"] = time.perf_counter() - t0
        rnd = jsonable(rnd)
        stem = os.path.join(self.out_dir, f"round_{server_round:03d}")
        with open(stem + ".json", "w") as f:
            json.dump(rnd, f, indent=1)
        for a, imgs in grids.items():
            if imgs and imgs[0].ndim == 4:
                rows = ([np.concatenate([np.asarray(t, np.float32) for t in truths])]
                        if len(truths) == len(imgs) else []) + [np.concatenate(imgs)]
                write_grid(f"{stem}_{slug(a)}.png", rows)
        self.reports.append(rnd)
        return rnd

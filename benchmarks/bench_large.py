"""Large layers: COPA and the security metric on inputs whose dense systems do not fit in memory.

    python benchmarks/bench_large.py            # both cases, float32, each in a fresh process
    python benchmarks/bench_large.py --case stem224

Cases (random init, one bundled photo resized to the input size, label 3):

* ``stem224``: a ResNet-style stem on a 3x224x224 input: 7x7 convolution, stride 2, padding 3, 64 channels,
  leaky ReLU(0.2), then a dense head (10 classes). ``stem224_c8``: the same with 8 channels, a rank-deficient layer
  (100352 forward + 1176 gradient rows for 150528 unknowns), where the metric must find the deficiency.
* ``conv64_128``: a 64->128 3x3 convolution at 32x32 (padding 1) below a 3->64 3x3 convolution, leaky ReLU(0.2)
  after each, then a dense head.

For each case, in a fresh process: ``jaxinv.copa`` seconds including compilation, PSNR against the photo, LSMR
iterations and residuals per layer, ``jaxinv.security`` seconds and its per-layer rank/deficiency, and the peak
resident memory of the process (``VmHWM``, which includes JAX's own ~0.5 GB). The dense column gives what the
reference method would materialise: the stacked matrix ``(forward rows + gradient rows) x unknowns`` in float32.
Writes benchmarks/out/large.json and large.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

SCRIPT = r"""
import json, time

def _hwm():  # peak resident set of this process (VmHWM: reset by exec, unlike ru_maxrss)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024

import jax, jax.numpy as jnp
import flax.linen as nn
import jaxinv
from jaxinv import data, metrics

CASE = {case!r}

class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        if CASE.startswith("stem224"):
            c = 8 if CASE == "stem224_c8" else 64
            x = nn.leaky_relu(nn.Conv(c, (7, 7), strides=(2, 2), padding=3)(x), 0.2)
        else:
            x = nn.leaky_relu(nn.Conv(64, (3, 3), padding=1)(x), 0.2)
            x = nn.leaky_relu(nn.Conv(128, (3, 3), padding=1)(x), 0.2)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))

size = 224 if CASE.startswith("stem224") else 32
net = Net()
x = data.sample_images(1, size=size, key=jax.random.PRNGKey(0))
variables = net.init(jax.random.PRNGKey(1), x)
model = jaxinv.from_linen(net, variables, input_shape=(size, size, 3), name=CASE)
g = jaxinv.client_gradient(model, x, jnp.array([3]))
jax.block_until_ready(g)
rss0 = _hwm()
t0 = time.perf_counter()
rec = jaxinv.copa(model, g, label=3)
jax.block_until_ready(rec.image)
t_copa = time.perf_counter() - t0
rss1 = _hwm()
t0 = time.perf_counter()
rep = jaxinv.security(model, key=jax.random.PRNGKey(0))
t_sec = time.perf_counter() - t0
rss2 = _hwm()
layers = []
for l, s in zip(rec.layers, rep.layers):
    rows = s.forward_rows + s.gradient_rows
    layers.append(dict(path=s.path, unknowns=s.unknowns, forward_rows=s.forward_rows, gradient_rows=s.gradient_rows,
                       dense_GB_float32=rows * s.unknowns * 4 / 2**30, rank=s.rank, deficiency=s.deficiency,
                       method=s.method, security_seconds=s.seconds, lsmr_steps=int(l.steps),
                       forward_residual=float(l.forward_residual), gradient_residual=float(l.gradient_residual),
                       copa_seconds=float(l.seconds)))
print(json.dumps(dict(case=CASE, input=[size, size, 3], copa_seconds_incl_compile=t_copa,
                      psnr=float(metrics.psnr(rec.image, x)[0]), security_seconds=t_sec, score=rep.score,
                      verdict=rep.verdict.split(":")[0], peak_rss_MB_after_copa=rss1, peak_rss_MB_after_security=rss2,
                      rss_MB_before=rss0, layers=layers, jax=jax.__version__, backend=jax.default_backend(),
                      cpus=__import__("os").cpu_count())))
"""

CASES = ("stem224", "conv64_128", "stem224_c8")


def run(case: str) -> dict:
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(case=case)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"case {case} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def markdown(rows) -> str:
    lines = ["# Large layers (float32, fresh process per case)", "",
             f"{rows[0]['cpus']} CPUs, backend {rows[0]['backend']}, jax {rows[0]['jax']}. Peak RSS includes JAX "
             "itself (about 0.5 GB before any work).", "",
             "| case | COPA s incl. compile | PSNR dB | security s | verdict | peak RSS MB (after copa / security) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['copa_seconds_incl_compile']:.1f} | {r['psnr']:.1f} | "
                     f"{r['security_seconds']:.1f} | {r['verdict']} | {r['peak_rss_MB_after_copa']:.0f} / "
                     f"{r['peak_rss_MB_after_security']:.0f} |")
    lines += ["", "| case | layer | unknowns | fwd rows | grad rows | dense matrix GB | rank (deficiency) | LSMR steps "
              "| fwd residual | grad residual | metric method |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for l in r["layers"]:
            lines.append(f"| {r['case']} | {l['path']} | {l['unknowns']} | {l['forward_rows']} | {l['gradient_rows']} "
                         f"| {l['dense_GB_float32']:.0f} | {l['rank']} ({l['deficiency']}) | {l['lsmr_steps']} | "
                         f"{l['forward_residual']:.1e} | {l['gradient_residual']:.1e} | {l['method']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=CASES, action="append")
    args = ap.parse_args(argv)
    rows = []
    for case in args.case or CASES:
        rows.append(run(case))
        r = rows[-1]
        print(f"{case}: copa {r['copa_seconds_incl_compile']:.1f}s PSNR {r['psnr']:.1f}, security "
              f"{r['security_seconds']:.1f}s, peak RSS {r['peak_rss_MB_after_security']:.0f} MB", flush=True)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "large.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(OUT, "large.md"), "w") as f:
        f.write(markdown(rows))
    print(f"wrote {OUT}/large.json and large.md")


if __name__ == "__main__":
    main()

"""The command line: demo on bundled photos, zoo listing, clear errors with a non-zero exit."""

import json
import os
import subprocess
import sys

from jaxinv import cli


def test_demo_runs_and_writes_grid(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--models", "cnn2_c1", "--n", "2", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "cnn2_c1" in text and "PSNR" in text
    res = json.loads((out / "results.json").read_text())
    assert res[0]["model"] == "cnn2_c1" and min(res[0]["psnr"]) > 30  # determined: recovered
    assert os.path.getsize(out / "demo_grid.png") > 1000


def test_demo_unknown_model(capsys):
    assert cli.main(["demo", "--models", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_zoo_lists_layers(capsys):
    assert cli.main(["zoo", "cnn3_c1"]) == 0
    out = capsys.readouterr().out
    assert "conv" in out and "dense" in out and "tanh" in out


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_help(capsys):
    assert cli.main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_sweep_command_writes_rows_and_resumes(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    args = ["sweep", "cnn2_c1", "--n", "2", "--out", str(out)]
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 + 2
    printed = capsys.readouterr().out
    assert "3 rows" in printed and "cnn2_c1" in printed
    assert all(r["psnr"] > 60 for r in rows if r["kind"] == "attack")
    assert cli.main(args) == 0  # resumed: nothing new
    assert len(out.read_text().splitlines()) == 3


def test_sweep_command_bad_model(tmp_path, capsys):
    assert cli.main(["sweep", "cnn2_c1,nope", "--out", str(tmp_path / "s.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "models['nope']" in err and len(err.strip().splitlines()) == 1


LAZY = """
import sys
import jaxinv
eager = {n for n in ("cli", "flower", "report") if "jaxinv." + n in sys.modules}
assert not eager and "flwr" not in sys.modules, eager  # the top floor is imported on first use only
assert jaxinv.zoo.names() and jaxinv.data.sample_images and jaxinv.metrics.psnr and jaxinv.defences
assert jaxinv.engine.copa is jaxinv.copa and jaxinv.attacks.attack is jaxinv.attack
assert jaxinv.report.render and jaxinv.cli.main and jaxinv.flower.AuditStrategy
names = {"attacks", "cli", "data", "defences", "engine", "flower", "metrics", "report", "zoo", "Client", "RESULTS"}
assert names <= set(dir(jaxinv)), names - set(dir(jaxinv))
assert {"Client", "RESULTS", "Execution"} <= set(jaxinv.__all__)
try:
    jaxinv.no_such_thing
except AttributeError as e:
    assert "no_such_thing" in str(e)
else:
    raise AssertionError("jaxinv.no_such_thing did not raise AttributeError")
print("OK")
"""


def test_submodules_are_lazy_attributes_of_the_package():
    """``import jaxinv`` alone makes every submodule an attribute (``jaxinv.zoo.names()``), listed by ``dir``; a
    fresh process, since this one has imported them all already."""
    r = subprocess.run([sys.executable, "-c", LAZY], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]

"""The command line: demo on bundled photos, zoo listing, clear errors with a non-zero exit."""

import json
import os


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

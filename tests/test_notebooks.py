"""The tutorial notebooks in notebooks/ run top to bottom, offline, and print what their text says they show.

Each notebook is executed with nbclient in a fresh kernel of this interpreter (a ``python3`` kernelspec pinned to
``sys.executable`` comes first on ``JUPYTER_PATH``, so a stray user kernelspec cannot win; checked from inside the
kernel), in a temporary working directory, with ``JAXINV_NB_FAST=1`` (fewer images, shorter budgets). Then the numbers it printed are read back and
checked against what is true of the models: a determined network is inverted exactly, a deficient one is not.
"""

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell


def test_notebooks_found_and_stripped():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_paper_comparison.ipynb",
        "03_architecture_study.ipynb",
        "04_federated.ipynb",
    ]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs not stripped"
        sources = "\n".join(c.source for c in book.cells)
        assert "USE_TFDS = False" in sources and 'os.environ.get("JAXINV_NB_FAST"' in sources, path.name


def run(path, workdir, monkeypatch):
    """Execute a copy of the notebook in workdir; returns (printed text, number of images shown, executable)."""
    book = nbformat.read(path, as_version=4)
    book.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL-EXECUTABLE', sys.executable)"))
    spec = workdir / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(workdir / "jupyter"))
    monkeypatch.setenv("JAXINV_NB_FAST", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        book, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    text, pictures = [], 0
    for cell in book.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == "stdout":
                text.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                pictures += "image/png" in out.data
                text.append(out.data.get("text/plain", ""))
    text = "\n".join(text)
    found = re.search(r"KERNEL-EXECUTABLE (.+)", text)  # None if that last output was lost (seen once in CI)
    return text, pictures, found.group(1).strip() if found else None


def table_rows(text, first_column):
    """Lines of a printed table whose first field matches first_column, split into fields."""
    return [line.split() for line in text.splitlines() if re.match(first_column, line)]


@pytest.mark.slow
def test_01_quickstart(tmp_path, monkeypatch):
    text, pictures, executable = run(NOTEBOOK_DIR / "01_quickstart.ipynb", tmp_path, monkeypatch)
    assert Path(executable) == Path(sys.executable)  # the kernel is this interpreter, with this jaxinv
    assert pictures >= 2
    mean = float(re.search(r"mean PSNR (\S+) dB; predicted by the security score: (\S+) dB", text).group(1))
    assert mean > 60  # one determined convolution: exact up to round-off
    rows = {" ".join(r[:-4]): r[-4:] for r in table_rows(text, r"SmallCNN")}
    index, score, psnr, verdict = rows["SmallCNN"]
    assert int(index) == 0 and verdict == "LEAKS" and float(psnr) > 60
    index, score, psnr, verdict = rows["SmallCNN stride 2"]
    assert int(index) < 0 and verdict != "LEAKS" and float(psnr) < 30
    report = tmp_path / "report" / "report.html"
    assert report.is_file() and report.stat().st_size > 10_000
    audit = {m[0]: float(m[1]) for m in re.findall(r"^(\w+)\s+mean PSNR\s+(\S+) dB", text, re.M)}
    assert set(audit) == {"copa", "ig"} and audit["copa"] > 60  # the audit's attack lines


@pytest.mark.slow
def test_02_paper_comparison(tmp_path, monkeypatch):
    text, pictures, _ = run(NOTEBOOK_DIR / "02_paper_comparison.ipynb", tmp_path, monkeypatch)
    header = next(line.split() for line in text.splitlines() if line.startswith("model") and "COPA index" in line)
    methods = header[3:]
    assert methods == ["rgap", "copa", "dlg", "ig", "hybrid"]
    table = {r[0]: dict(index=int(r[1]), **dict(zip(methods, map(float, r[2:])))) for r in table_rows(text, r"cnn\d_c\d+\s")}
    assert set(table) == {"cnn2_c1", "cnn2_c2"}  # FAST leaves out cnn4_c1 (its compilation is the slowest)
    determined = table["cnn2_c1"]
    assert determined["index"] == 0 and determined["copa"] > 60 and determined["rgap"] > 60
    deficient = table["cnn2_c2"]
    assert deficient["index"] < 0 and deficient["copa"] < 30
    assert abs(deficient["copa"] - deficient["rgap"]) < 0.5  # one engine, as the text says
    assert re.search(r"^cnn2_c2: best .*\(\d+\.\d dB\)", text, re.M)
    assert pictures >= 2  # one grid per model


@pytest.mark.slow
def test_03_architecture_study(tmp_path, monkeypatch):
    text, pictures, _ = run(NOTEBOOK_DIR / "03_architecture_study.ipynb", tmp_path, monkeypatch)
    rows = [dict(stride=int(r[0]), channels=int(r[1]), deficiency=int(r[4]), index=int(r[5]), psnr=float(r[7]))
            for r in table_rows(text, r"\s+[12]\s+\d+\s+\d+")]
    assert len(rows) >= 4 and {r["stride"] for r in rows} == {1, 2}
    for r in rows:
        if r["deficiency"] == 0:
            assert r["psnr"] > 40, r  # exact up to round-off and the system's conditioning
        else:
            assert r["psnr"] < 30 and r["index"] < 0, r
    assert any(r["deficiency"] == 0 for r in rows) and any(r["deficiency"] > 0 for r in rows)
    assert re.search(r"Spearman rank correlation with the measured PSNR: score -?\d", text)
    assert pictures >= 2


@pytest.mark.slow
def test_04_federated(tmp_path, monkeypatch):
    text, pictures, _ = run(NOTEBOOK_DIR / "04_federated.ipynb", tmp_path, monkeypatch)
    rows = [(m[0], float(m[1]), float(m[2]))
            for m in re.findall(r"^defence (\S+\(.*?\))\s+predicted\s+(\S+) dB measured\s+(\S+) dB", text, re.M)]
    assert len(rows) >= 4
    noise = [r for r in rows if r[0].startswith("gaussian")]
    assert noise[0][2] > noise[-1][2] + 15  # more noise, worse reconstruction
    for name, pred, meas in rows:
        assert abs(pred - meas) < 8, (name, pred, meas)  # the metric's prediction against COPA on the photos
    b = re.search(r"batch B=\d+: COPA mean PSNR (\S+) dB \(matched\), predicted (\S+) dB; labels (\[.*?\]) vs "
                  r"(\[.*?\])", text)
    assert float(b.group(1)) > 60 and float(b.group(2)) > 60 and b.group(3) == b.group(4)
    fed = re.findall(r"FedAvg K=\d+ lr=\S+: first-order (\S+) dB, corrected (\S+) dB, predicted (\S+) dB", text)
    assert len(fed) >= 1
    for first, fixed, pred in fed:
        assert float(fixed) > float(first) + 10, fed  # simulating the client's steps undoes much of them
    assert "epsilon = " in text and pictures >= 1

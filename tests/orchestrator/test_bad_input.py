"""Bad input through the real CLI, as a new user types it: exit 2 (or 3 for missing hardware / an unusable
service), one line on stderr naming the problem and the fix, no traceback, and nothing started or written:
no output folder, no MLflow store, no Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
SEARCH = str(ROOT / "configs" / "search" / "bd_teacher.yaml")
TINY = ["--set", "sweep.widths=[8,16]", "--set", "sweep.seeds=1", "--set", "sweep.variants=[]"]


def _files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "empty": "", "comments": "# a config to fill in later\n",
        "wide": "sweep: {widths: [16, 1000000000000], seeds: 1}\n",
        "bigdim": "task: {kind: spherical_3spin, dim: 100000}\nsweep: {widths: [8, 16], seeds: 1}\n",
        "workers": "execution: {workers: 100000}\n", "cpw": "execution: {cpus_per_worker: 100000}\n",
        "widefid": "search:\n  space: {dynamics.lr: {type: float, low: 0.01, high: 1.0, log: true}}\n"
                   "  fidelity: {widths: [16, 1000000000000], top_k: 2}\n  trials: 4\n",
    }
    out = {}
    for name, text in files.items():
        out[name] = tmp_path / f"{name}.yaml"
        out[name].write_text(text)
    out["binary"] = tmp_path / "binary.yaml"
    out["binary"].write_bytes(bytes(range(256)))
    out["a_file"] = tmp_path / "results.txt"
    out["a_file"].write_text("not a folder\n")
    return out


# (argv with {placeholders}, exit code, words the one line must contain)
CASES = [
    (["scaling", "{empty}"], 2, ["is empty"]),
    (["validate", "{comments}"], 2, ["is empty"]),
    (["scaling", "{binary}"], 2, ["not UTF-8"]),
    (["scaling", "{tmp}"], 2, ["is a folder"]),
    (["scaling", SEARCH], 2, ["mfsweep search"]),
    (["scaling", *TINY, "--out", "{a_file}"], 2, ["existing file", "folder"]),
    (["scaling", *TINY, "--out", "{a_file}/sub"], 2, ["is a file"]),
    (["scaling", *TINY, "--device", "cuda"], 3, ["no usable GPU", "--device cpu"]),
    (["search", SEARCH, "--device", "cuda"], 3, ["no usable GPU", "--device cpu"]),
    (["scaling", "{wide}"], 2, ["width 1000000000000 needs", "GiB", "lower the width"]),
    (["scaling", "{bigdim}"], 2, ["needs", "task.dim"]),
    (["search", "{widefid}"], 2, ["width 1000000000000 needs"]),
    (["scaling", "{workers}", *TINY], 2, ["execution.workers=100000", "CPUs"]),
    (["scaling", "{cpw}", *TINY], 2, ["cpus_per_worker=100000"]),
    (["scaling", *TINY, "--backend", "local", "--address", "127.0.0.1:6379"], 2, ["needs execution.backend=ray"]),
    (["scaling", *TINY, "--tracking-uri", "foo://bar"], 2, ["scheme 'foo'", "sqlite:///"]),
    (["scaling", *TINY, "--address", "127.0.0.1:{port}"], 3, ["cannot reach Ray", "--address"]),
    (["scaling", "--device", "gpu"], 2, ["invalid choice", "--help"]),
    (["resume", "{a_file}"], 2, ["not an mfsweep output folder"]),
    (["scaling", *TINY, "--set", "sweep.variants=[{{name: bd+clone}}]"], 2, ["sweep.variants.0.name", "pattern"]),
]


@pytest.mark.parametrize(("argv", "code", "words"), CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                   argv: list[str], code: int, words: list[str]) -> None:
    import ray
    import torch

    # The GPU cases must fail the same way on a machine that has one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)  # the default output folder (runs/...) would land here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    subst = {k: str(v) for k, v in _files(tmp_path).items()} | {"tmp": str(tmp_path), "port": str(free_port())}
    args = [a.format(**subst) for a in argv]
    out = tmp_path / "out"
    if "--out" not in args and args[0] in ("scaling", "search"):
        args += ["--out", str(out)]
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        got = main(args)
    except SystemExit as exc:  # argparse's errors
        got = exc.code
    err = capsys.readouterr().err.strip()
    assert got == code, err
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output folder, no MLflow store
    assert not ray.is_initialized()


PROBE = """
import json, sys
from orchestrator.cli import main
codes = [main(argv) for argv in json.loads(sys.argv[1])]
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "ray", "optuna", "mlflow", "sklearn"})
print(json.dumps([codes, heavy]))
"""


def test_config_errors_and_validate_load_no_heavy_module(tmp_path: Path) -> None:
    """Validation (scaling and search configs) never imports torch, Ray, Optuna or MLflow: that is what
    makes a rejected config or `mfsweep validate` answer in well under a second."""
    typo = tmp_path / "typo.yaml"
    typo.write_text("modle: {unit: relu}\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    argvs = [["validate", str(ROOT / "configs" / "scaling" / "spin3.yaml")], ["validate", SEARCH],
             ["validate", str(ROOT / "configs" / "papers" / "bd_closed_form.yaml")],
             ["scaling", str(typo)], ["scaling", str(empty)], ["search", SEARCH, "--trials", "0"]]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    codes, heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert codes == [0, 0, 0, 2, 2, 2], proc.stderr
    assert heavy == []


def test_import_probe_sees_heavy_modules() -> None:
    """Control for the probe above: the same check does see torch once the engine's Pack is touched."""
    code = "import sys, workers.engine as e; e.Pack; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "True"

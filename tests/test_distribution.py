"""Distributions: the wheel carries the bundled assets, and works installed outside the checkout.

The fast test builds a wheel and compares its files with the repository's ``assets/``; the slow one
runs ``make dist`` and uses the installed wheel, from a folder outside the checkout, the way a user
who ran ``pip install vlmsafe-*.whl`` would: ``vlmsafe --version``, ``vlmsafe demo --no-merge`` and
one Python example, offline.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import vlmsafe

ROOT = Path(__file__).resolve().parents[1]


def _build(outdir: Path, *what: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", *what, "--outdir", str(outdir), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _bundled_files() -> set[str]:
    """Every file under assets/ that the wheel must carry (the README's figures are documentation)."""
    out = set()
    for path in (ROOT / "assets").rglob("*"):
        rel = path.relative_to(ROOT / "assets")
        if path.is_file() and rel.parts[0] != "readme" and "__pycache__" not in rel.parts:
            out.add(rel.as_posix())
    return out


def test_wheel_carries_every_bundled_asset_and_the_single_version(tmp_path):
    _build(tmp_path, "--wheel")
    (wheel,) = tmp_path.glob("vlmsafe-*.whl")
    assert wheel.name.startswith(f"vlmsafe-{vlmsafe.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(meta).decode()
    carried = {n.removeprefix("vlmsafe_assets/") for n in names if n.startswith("vlmsafe_assets/")}
    assert _bundled_files() <= carried, sorted(_bundled_files() - carried)[:10]
    weights = {"testbed/model.safetensors", "testbed/aligned_lm/model.safetensors", "safeclip/safe/model.safetensors"}
    assert weights <= carried
    assert not any(n.startswith(("tests/", "benchmarks/", "assets/")) for n in names)
    assert f"\nVersion: {vlmsafe.__version__}\n" in metadata
    assert any(n.startswith("probes/") for n in names) and "vlmsafe/py.typed" in names
    # the size the README states (its "Install sizes"), in MB as the README rounds it
    stated = re.search(r"`vlmsafe-<version>-py3-none-any.whl`, (\d+) MB\)", (ROOT / "README.md").read_text())
    assert stated and int(stated[1]) == round(wheel.stat().st_size / 1e6), wheel.stat().st_size


def test_bundled_assets_are_found_through_the_package_not_the_source_tree():
    import vlmsafe_assets

    from vlmsafe.resources import assets_root, bundled_asset
    from vlmsafe.testbed import testbed_dir
    from vlmsafe.testbed.safeclip import default_assets_dir

    root = Path(vlmsafe_assets.__file__).parent
    assert assets_root() == root
    assert testbed_dir() == bundled_asset("testbed") == root / "testbed"
    assert default_assets_dir() == root / "safeclip"
    assert (testbed_dir() / "config.json").is_file()


def _venv_outside_the_checkout(tmp_path: Path) -> Path:
    """A new virtual environment that sees this environment's third-party packages (torch, transformers, ...:
    nothing is downloaded) but not vlmsafe: the wheel is installed into it with ``--no-deps``."""
    venv = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True,
                   timeout=300)
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()
    # a plain path line: the editable vlmsafe install of this environment (a .pth finder) is not activated by it
    Path(site, "host-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_and_an_example_outside_the_checkout(tmp_path):
    run = subprocess.run(["make", "-C", str(ROOT), "dist"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    wheels = sorted((ROOT / "dist").glob("*.whl"))
    assert [w.name for w in wheels] == [f"vlmsafe-{vlmsafe.__version__}-py3-none-any.whl"]
    assert len(list((ROOT / "dist").glob("*.tar.gz"))) == 1
    venv = _venv_outside_the_checkout(tmp_path)
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLMSAFE_TESTBED")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # without PYTHONPATH: a checkout on it holds the vlmsafe.egg-info `make dist` leaves, and pip would take that
    # for an installed vlmsafe ("already satisfied") and install nothing
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", *map(str, wheels)], check=True,
                   timeout=300, env=env)
    assert (venv / "bin" / "vlmsafe").is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()

    def sh(*cmd: str, timeout: int = 600) -> str:
        res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, (cmd, res.stdout[-3000:], res.stderr[-3000:])
        return res.stdout

    assert sh(str(venv / "bin" / "vlmsafe"), "--version").strip() == f"vlmsafe {vlmsafe.__version__}"
    where = sh(py, "-c", "import vlmsafe, vlmsafe_assets; print(vlmsafe.__file__); print(vlmsafe_assets.__file__)")
    assert all(str(venv) in line and str(ROOT) not in line for line in where.split())
    example = (
        "from vlmsafe.adapters import get_adapter\n"
        "from vlmsafe.data import load_items\n"
        "from vlmsafe.testbed import load_testbed, testbed_dir\n"
        "model, processor = load_testbed()\n"
        "item = next(i for i in load_items(testbed_dir() / 'data' / 'test.jsonl') if i.label == 'harmful')\n"
        "inputs = get_adapter(model, processor).build_inputs([item.prompt], [item.load_image()])\n"
        "out = model.generate(**inputs, max_new_tokens=8, do_sample=False)\n"
        "print(processor.batch_decode(out[:, inputs['input_ids'].shape[1]:], skip_special_tokens=True)[0])\n"
    )
    assert sh(py, "-c", example).strip()
    # one steering setting instead of the calibration grid: this checks the install, not the figures
    sh(str(venv / "bin" / "vlmsafe"), "demo", "--no-merge", "--no-progress", "--alphas", "1.5", "--layers", "3",
       "--out", str(work / "demo"), timeout=1500)
    report = json.loads((work / "demo" / "report.json").read_text())
    assert len(report["rows"]) >= 4
    assert "safe_clip" in report and "safe_clip_t2i" in report  # every bundled testbed was found

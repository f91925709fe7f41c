"""Packaging: one onnxruntime package per install, and a wheel that installs and runs anywhere.

onnxruntime (the core's, CPU, wheels for every platform) and onnxruntime-gpu (the `gpu` extra's)
install the same `onnxruntime` module, so an install holds exactly one of them:
``requirements/deps.py`` lists the requirements the Makefile and the images install.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import yaml

import seqops
from seqops.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
LOCK_PATH = ROOT / "requirements" / "constraints.txt"
DEPS_SCRIPT = ROOT / "requirements" / "deps.py"
ORT_PACKAGES = {"onnxruntime", "onnxruntime-gpu"}


def normalize(name: str) -> str:
    """PEP 503 name: `onnxruntime_gpu` and `ONNXRuntime-GPU` are `onnxruntime-gpu`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"[A-Za-z0-9._-]+", requirement).group())


def run(cmd: list[str | Path], timeout: float = 120, check: bool = True):
    """Run a command; on failure the assertion shows its output."""
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{cmd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def listed_requirements(extras: str) -> set[str]:
    """Distribution names that `requirements/deps.py EXTRAS` lists."""
    out = run([sys.executable, DEPS_SCRIPT, extras]).stdout
    return {requirement_name(line) for line in out.splitlines()}


def locked_versions() -> dict[str, str]:
    lines = LOCK_PATH.read_text().splitlines()
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    return {normalize(name): version for name, version in pins}


def subcommands() -> set[str]:
    """The `seqops` subcommands, from the source's own parser."""
    (action,) = [a for a in build_parser()._actions if a.dest == "command"]
    return set(action.choices)


# --- one onnxruntime package ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("extras", "wanted"),
    [
        ("", "onnxruntime"),
        ("pipeline,train,serve,dev", "onnxruntime"),
        ("serve,gpu", "onnxruntime-gpu"),
        ("pipeline,train,serve,dev,gpu", "onnxruntime-gpu"),
    ],
)
def test_an_install_lists_exactly_one_onnxruntime_package(extras: str, wanted: str):
    assert listed_requirements(extras) & ORT_PACKAGES == {wanted}


def test_unknown_extras_are_an_error():
    result = run([sys.executable, DEPS_SCRIPT, "serve,gpus"], check=False)
    assert result.returncode != 0
    assert "gpus" in result.stderr


def test_the_lock_pins_both_onnxruntime_packages_at_one_version():
    versions = locked_versions()
    assert versions["onnxruntime"] == versions["onnxruntime-gpu"]
    assert "build" in versions  # the dev extra's wheel builder


def test_gpu_images_and_only_they_install_the_gpu_extra():
    services = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    seqops_dockerfiles = {"docker/serve.Dockerfile", "docker/train.Dockerfile"}
    built = {
        name: service
        for name, service in services.items()
        if service.get("build", {}).get("dockerfile") in seqops_dockerfiles
    }
    assert set(built) == {"worker-cpu", "worker-gpu", "serve-cpu", "serve-gpu"}
    for name, service in built.items():
        extras = service["build"]["args"]["EXTRAS"].split(",")
        assert ("gpu" in extras) == ("gpu" in service["profiles"]), name
    for dockerfile in seqops_dockerfiles:
        text = (ROOT / dockerfile).read_text()
        assert "requirements/deps.py" in text, dockerfile
        (default,) = re.findall(r"^ARG EXTRAS=(\S*)$", text, flags=re.M)
        assert "gpu" not in default.split(","), f"{dockerfile}: the default image is the CPU one"


# --- the wheel ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build --wheel` on a copy of what the package is made of.

    A copy, so that setuptools' `build/` directory (whose stale modules would end up in later
    wheels) and the egg-info never land in the working tree.
    """
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("seqops", "serve", "flows"):
        shutil.copytree(
            ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    run([sys.executable, "-m", "build", "--wheel", "--outdir", tmp / "dist", src], timeout=600)
    (wheel,) = (tmp / "dist").glob("seqops-*.whl")
    return wheel


@pytest.mark.e2e
@pytest.mark.slow
def test_wheel_holds_the_three_packages_the_license_and_the_version(wheel_path: Path):
    names = zipfile.ZipFile(wheel_path).namelist()
    dist_info = f"seqops-{seqops.__version__}.dist-info"
    top_level = {name.split("/")[0] for name in names} - {dist_info}
    assert top_level == {"seqops", "serve", "flows"}
    for module in ("seqops/cli.py", "seqops/predictor.py", "serve/app.py", "flows/pipeline.py"):
        assert module in names
    for asset in ("index.html", "app.js", "state.js", "view.js", "app.css"):  # the page at /
        assert f"serve/static/{asset}" in names
    assert f"{dist_info}/licenses/LICENSE" in names

    metadata = Parser().parsestr(zipfile.ZipFile(wheel_path).read(f"{dist_info}/METADATA").decode())
    assert metadata["Version"] == seqops.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    requires = metadata.get_all("Requires-Dist")
    core = {requirement_name(r) for r in requires if "extra ==" not in r}
    assert core == {"numpy", "pillow", "pyyaml", "pydantic", "onnxruntime"}


@pytest.mark.e2e
@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_clean_venv(wheel_path: Path, tmp_path: Path):
    """The core alone, from the registry with the lock: `seqops --help` and the predictor."""
    venv = tmp_path / "venv"
    # No --system-site-packages: only what the wheel pulls in.
    run([sys.executable, "-m", "venv", venv])
    python, pip = venv / "bin" / "python", venv / "bin" / "pip"
    run([pip, "install", "-q", "-c", LOCK_PATH, wheel_path], timeout=900)

    help_text = run([venv / "bin" / "seqops", "--help"]).stdout
    assert len(subcommands()) >= 5
    for command in subcommands():
        assert command in help_text

    listed = json.loads(run([pip, "list", "--format", "json"]).stdout)
    installed = {normalize(d["name"]) for d in listed}
    assert installed & ORT_PACKAGES == {"onnxruntime"}
    assert "torch" not in installed
    # The torch-free core (the predictor) imports with the core dependencies alone.
    run([python, "-c", "import onnxruntime, seqops.predictor"])

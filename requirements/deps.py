"""Print seqops' direct requirements for some extras, one a line, for `pip install -r`.

    python requirements/deps.py serve,gpu > /tmp/requirements.txt
    pip install -c requirements/constraints.txt -r /tmp/requirements.txt
    pip install --no-deps .

onnxruntime (the core's) and onnxruntime-gpu (the `gpu` extra's) install the same `onnxruntime`
module, so they must never be installed together. pip cannot leave a core dependency out when an
extra is asked for, hence this list: with `gpu`, onnxruntime-gpu replaces onnxruntime. The
Makefile's install and the images use it; the package itself then goes in with `--no-deps`.
Standard library only: it runs in a bare venv before anything is installed.
"""

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT_PATH = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirement_name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement (`onnxruntime-gpu[cuda]>=1`)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group()
    return re.sub(r"[-_.]+", "-", name).lower()


def select_requirements(project: dict, extras: list[str]) -> list[str]:
    """The core dependencies plus those of `extras`, with one onnxruntime package.

    Args:
        project: the `[project]` table of pyproject.toml.
        extras: names of `[project.optional-dependencies]`.

    Returns:
        Requirement strings, as written in pyproject.toml.
    """
    optional = project["optional-dependencies"]
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise ValueError(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    requirements = list(project["dependencies"])
    if "gpu" in extras:
        requirements = [r for r in requirements if requirement_name(r) != "onnxruntime"]
    for extra in extras:
        requirements += optional[extra]
    return requirements


def main() -> None:
    extras = [e.strip() for e in (sys.argv[1] if len(sys.argv) > 1 else "").split(",")]
    project = tomllib.loads(PYPROJECT_PATH.read_text())["project"]
    try:
        print("\n".join(select_requirements(project, [e for e in extras if e])))
    except ValueError as error:
        sys.exit(f"requirements/deps.py: {error}")


if __name__ == "__main__":
    main()

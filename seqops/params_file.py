"""Write dotted-key overrides into ``params.yaml``, keeping its comments and layout.

What ``dvc exp run -S`` does to the workspace, without running anything: the values are
validated against the typed config first, then written with a ruamel round-trip (comments,
key order and untouched scalars stay as written) and the file is replaced atomically, so DVC
sees each change (``dvc params diff``, ``dvc.lock``) and ``dvc repro`` afterwards agrees.

The pipeline flow uses it for its ``overrides``; ``ruamel.yaml`` comes with DVC (the
``pipeline`` extra), so this module is imported only where DVC is installed.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.representer import RoundTripRepresenter

from seqops.config import (
    DEFAULT_PARAMS_PATH,
    ConfigError,
    apply_overrides,
    params_from_dict,
    read_params_file,
)


def write_overrides(
    overrides: Mapping[str, Any], params_path: str | Path = DEFAULT_PARAMS_PATH
) -> dict[str, dict[str, Any]]:
    """Write dotted-key overrides into the params file, keeping its comments and layout.

    Keys and values are validated against the typed config first (``apply_overrides``,
    ``params_from_dict``): on a bad key or value nothing is written. The file is replaced
    atomically and keeps its permissions.

    Returns:
        ``{key: {"old": ..., "new": ...}}`` for the keys whose value changed (empty: the
        file was left untouched).
    """
    params_path = Path(params_path)
    raw = read_params_file(params_path)
    expected = apply_overrides(raw, list(overrides.items()))
    params_from_dict(expected, source=f"{params_path} with overrides {dict(overrides)}")
    changes = {
        key: {"old": _lookup(raw, key), "new": _lookup(expected, key)}
        for key in overrides
        if _lookup(raw, key) != _lookup(expected, key)
    }
    if not changes:
        return {}
    text = _render_with_overrides(params_path.read_text(), overrides)
    if yaml.safe_load(text) != expected:  # a guard: what seqops reads back must be what we meant
        raise ConfigError(f"{params_path}: could not write overrides {dict(overrides)} faithfully")
    _replace_file(params_path, text)
    return changes


def _render_with_overrides(text: str, overrides: Mapping[str, Any]) -> str:
    """The YAML ``text`` with each dotted key set, everything else kept as written."""
    rt = _round_trip_yaml()
    document = rt.load(text)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = document
        for part in parents:
            if not isinstance(node.get(part), Mapping):
                node[part] = _to_yaml_node({})
            node = node[part]
        node[leaf] = _to_yaml_node(value)
    buffer = io.StringIO()
    rt.dump(document, buffer)
    return buffer.getvalue()


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key, ``None`` when a part is missing."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _replace_file(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a temporary file renamed over it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --- YAML 1.1-safe round trip --------------------------------------------------------------


def _represent_float(representer: Any, value: float) -> Any:
    """A float that YAML 1.1 reads back as a float (``1.0e-05``, ``.nan``, ``-.inf``)."""
    if value != value:
        text = ".nan"
    elif value in (float("inf"), float("-inf")):
        text = ".inf" if value > 0 else "-.inf"
    else:
        text = repr(value)
        if "e" in text and "." not in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _represent_str(representer: Any, value: str) -> Any:
    """A string, quoted when YAML 1.1 would read it plain as something else."""
    try:
        plain_ok = yaml.safe_load(value) == value
    except yaml.YAMLError:
        plain_ok = False
    return representer.represent_scalar(
        "tag:yaml.org,2002:str", value, style=None if plain_ok else '"'
    )


def _represent_none(representer: Any, value: None) -> Any:
    """``null`` spelled out: ruamel writes an empty value, which would rewrite such lines."""
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


class _ParamsRepresenter(RoundTripRepresenter):
    """seqops reads params.yaml with PyYAML (YAML 1.1): new floats get a dot (``1.0e-05``,
    which 1.1 reads as a float, not ``1e-05``, a string there), strings that 1.1 would read
    as something else (``yes``, ``1e3``) are quoted, and ``null`` stays ``null``. A subclass,
    so that ruamel's own representer stays as it is for everyone else in the process."""


_ParamsRepresenter.add_representer(float, _represent_float)
_ParamsRepresenter.add_representer(str, _represent_str)
_ParamsRepresenter.add_representer(type(None), _represent_none)


def _round_trip_yaml() -> YAML:
    """A ruamel round-trip loader/dumper with the YAML 1.1-safe representer."""
    rt = YAML()  # round-trip: keeps comments, key order and untouched scalars as written
    rt.Representer = _ParamsRepresenter
    rt.width = 4096  # never wrap a long value onto a second line
    return rt


def _to_yaml_node(value: Any) -> Any:
    """Plain dicts and lists as ruamel nodes; lists in flow style, like the file's."""
    if isinstance(value, Mapping):
        node = CommentedMap()
        for key, item in value.items():
            node[key] = _to_yaml_node(item)
        return node
    if isinstance(value, list | tuple):
        seq = CommentedSeq(_to_yaml_node(v) for v in value)
        seq.fa.set_flow_style()  # `classes: [a, b]`, like the file's `classes: []`
        return seq
    return value

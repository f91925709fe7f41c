"""`seqops --help` and each command's help: what it does, every option explained with its
default, and a --set example the command really reads."""

from __future__ import annotations

import argparse
import re

import pytest
import yaml
from conftest import ROOT

from seqops.cli import build_parser
from seqops.config import load_params


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every leaf subcommand's parser by its name (``data stats`` for the nested ones)."""
    found = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}".strip())
                return
        found[prefix] = parser

    walk(build_parser(), "")
    return found


def test_the_top_help_says_what_seqops_does_for_the_user():
    text = build_parser().format_help()
    assert "Count objects in images one at a time" in text and "adapter" not in text
    assert "seqops predict examples/scene.png" in text  # an example to start from


@pytest.mark.parametrize("name", sorted(set(subcommands()) - {"serve"}))  # serve: its own
def test_every_option_is_explained_with_its_default(name):
    parser = subcommands()[name]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        assert action.help, f"seqops {name} {action.dest}: no help"
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        if shown:
            assert f"(default: {action.default})" in text, (name, action.dest)


STAGE_PARAMS = {  # the command -> the dvc.yaml stage whose params it reads
    "prepare": "prepare", "train": "train", "export": "export", "evaluate": "evaluate",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(STAGE_PARAMS))
def test_the_set_example_is_a_parameter_the_command_reads(name):
    text = " ".join(subcommands()[name].format_help().split())
    key, value = re.search(r"e\.g\. --set (\S+)=(\S+)", text).groups()
    load_params(ROOT / "params.yaml", [f"{key}={value}"])  # a valid key and value
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][STAGE_PARAMS[name]]
    reads = [p if isinstance(p, str) else next(iter(p)) for p in stage["params"]]
    assert any(key == p or key.startswith(p + ".") for p in reads), (key, reads)

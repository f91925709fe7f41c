"""`seqops serve`'s command line belongs to the service: flags and defaults from ServeSettings."""

from __future__ import annotations

import pytest

from seqops.cli import main
from serve.run import SETTINGS_FLAGS, build_parser, settings_from_args
from serve.settings import ServeSettings


def test_every_flag_defaults_to_its_settings_field():
    args = build_parser().parse_args([])
    settings = settings_from_args(args, "models/onnx", None)
    assert settings == ServeSettings(model="models/onnx")
    assert {field for field, _, _ in SETTINGS_FLAGS.values()} <= set(ServeSettings.model_fields)


def test_flags_reach_the_settings():
    argv = ["--max-objects", "7", "--no-batching", "--max-body-mb", "2", "--deadline", "5"]
    settings = settings_from_args(build_parser().parse_args(argv), "m", "3")
    assert (settings.max_objects, settings.max_active, settings.deadline_s) == (7, 1, 5.0)
    assert settings.max_body_bytes == 2 * 1024 * 1024 and settings.model_version == "3"


def test_encode_share_reaches_the_settings_and_a_bad_one_is_named():
    args = build_parser().parse_args(["--encode-share", "1"])
    assert settings_from_args(args, "m", None).encode_share == 1.0
    with pytest.raises(ValueError, match="encode_share"):
        settings_from_args(build_parser().parse_args(["--encode-share", "2"]), "m", None)


def test_seqops_serve_passes_its_arguments_to_the_service(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: seqops serve") and "--max-objects-limit" in out


def test_other_commands_still_reject_unknown_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--max-queue", "3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --max-queue 3" in capsys.readouterr().err

"""``seqops.params_file``: overrides written into params.yaml, comments and layout kept."""

import shutil

import pytest
from flow_fixtures import ROOT

from seqops.config import ConfigError, load_params
from seqops.params_file import write_overrides


@pytest.fixture
def params_path(tmp_path):
    """A copy of the project's params.yaml."""
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


def _comments(yaml_text: str) -> list[str]:
    return [line.split("#", 1)[1] for line in yaml_text.splitlines() if "#" in line]


def test_write_overrides_keeps_comments_and_reads_back(params_path):
    params_path.chmod(0o644)
    before = params_path.read_text()
    original = load_params(params_path)
    changes = write_overrides(
        {
            "train.epochs": original.train.epochs + 1,
            "train.lr": 1e-5,  # repr "1e-05": PyYAML would read that back as a string
            "prepare.fsc147.classes": ["apple", "yes"],  # "yes" is a bool in YAML 1.1
            "prepare.seed": original.prepare.seed,  # unchanged
        },
        params_path,
    )
    assert set(changes) == {"train.epochs", "train.lr", "prepare.fsc147.classes"}
    assert changes["train.epochs"] == {
        "old": original.train.epochs,
        "new": original.train.epochs + 1,
    }
    params = load_params(params_path)
    assert params.train.epochs == original.train.epochs + 1 and params.train.lr == 1e-5
    assert params.prepare.fsc147.classes == ("apple", "yes")
    text = params_path.read_text()
    assert _comments(text) == _comments(before)  # every comment survives, header included
    assert 'classes: [apple, "yes"]' in text
    changed = [a for a, b in zip(before.splitlines(), text.splitlines(), strict=True) if a != b]
    assert len(changed) == 3  # one line per changed key, nothing else rewritten
    assert params_path.stat().st_mode & 0o777 == 0o644


def test_write_overrides_rejects_bad_keys_and_values_without_writing(params_path):
    before = params_path.read_text()
    with pytest.raises(ConfigError, match="train has no key 'epoch'"):
        write_overrides({"train.epoch": 3}, params_path)
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        write_overrides({"train.epochs": "three"}, params_path)
    assert params_path.read_text() == before


def test_write_overrides_without_a_change_leaves_the_file_alone(params_path):
    inode = params_path.stat().st_ino
    epochs = load_params(params_path).train.epochs
    assert write_overrides({"train.epochs": epochs}, params_path) == {}
    assert write_overrides({}, params_path) == {}
    assert params_path.stat().st_ino == inode


def test_write_overrides_spells_null_out(params_path):
    write_overrides({"model.stride": 8}, params_path)
    assert write_overrides({"model.stride": None}, params_path) == {
        "model.stride": {"old": 8, "new": None}
    }
    text = params_path.read_text()
    assert "  stride: null" in text and "peak_window: null" in text
    assert load_params(params_path).model.stride is None

"""The typed config: params.yaml loads, overrides work like `dvc exp run -S`, mistakes are named."""

from pathlib import Path

import pytest
import yaml

from seqops.config import ConfigError, Params, load_params, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_matches_the_models():
    params = load_params(ROOT / "params.yaml")
    # Every key in params.yaml is a field, and the file spells out every field (no hidden defaults).
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params.model_dump(mode="json") == Params.model_validate(raw).model_dump(mode="json")

    def keys(d, prefix=""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from keys(v, prefix + k + ".")

    assert set(keys(raw)) == set(keys(params.model_dump(mode="json")))


def test_overrides_apply_and_parse_as_yaml():
    params = load_params(ROOT / "params.yaml", ["prepare.num_train=200", "prepare.seed=3"])
    assert params.prepare.num_train == 200 and params.prepare.seed == 3
    params = load_params(ROOT / "params.yaml", ["train.loss.variant=continuous"])
    assert params.train.loss.variant == "continuous"
    assert parse_override("prepare.fsc147.classes=[apples, 'sea shells']") == (
        "prepare.fsc147.classes",
        ["apples", "sea shells"],
    )


def test_config_is_frozen():
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(ValueError):
        params.prepare.seed = 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("prepare.num_trian=5", "prepare has no key 'num_trian'"),
        ("prepar.seed=5", "params has no key 'prepar'"),
        ("prepare.seed.x=5", "prepare.seed is not a section"),
        ("prepare.seed=three", "prepare.seed: Input should be a valid integer"),
        ("prepare.num_train=2.5", "prepare.num_train: Input should be a valid integer"),
        ("prepare.order=random", "prepare.order: Input should be 'reading_order'"),
        ("train.loss.threshold=-1", "train.loss.threshold: Input should be greater than 0"),
        ("prepare.seed", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_params(ROOT / "params.yaml", [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("prepare:\n  seed: 1\n  num_trian: 5\ntrain:\n  lr: fast\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    text = str(info.value)
    assert str(path) in text
    assert "prepare.num_trian: unknown key" in text
    assert "train.lr: Input should be a valid number" in text


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(bad)

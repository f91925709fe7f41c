"""The typed config: params.yaml loads, overrides work like `dvc exp run -S`, mistakes are named.

params.yaml is the only source of defaults: every key is required.
"""

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

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
        ("model.stride=0", "model.stride: Input should be greater than or equal to 1"),
        ("model.peak_window=-1", "model.peak_window: Input should be greater than or equal to 0"),
        ("prepare.seed", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_params(ROOT / "params.yaml", [override])


def _write_real_params(path: Path, edit) -> Path:
    """The project's params.yaml, changed by ``edit(raw)``, written to ``path``."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    def edit(raw):
        raw["prepare"]["num_trian"] = 5
        raw["train"]["lr"] = "fast"

    path = _write_real_params(tmp_path / "p.yaml", edit)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    text = str(info.value)
    assert str(path) in text
    assert "prepare.num_trian: unknown key" in text
    assert "train.lr: Input should be a valid number" in text


def test_missing_key_in_file_names_file_and_key(tmp_path):
    """params.yaml is the only source of defaults: a key it lacks has no fallback."""

    def edit(raw):
        del raw["train"]["epochs"]
        del raw["model"]["stride"]  # null is a value ("the preset's"); no key is an error
        del raw["promote"]

    path = _write_real_params(tmp_path / "p.yaml", edit)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    text = str(info.value)
    assert str(path) in text
    assert "train.epochs: missing key" in text
    assert "model.stride: missing key" in text
    assert "promote: missing key" in text


def test_the_typed_config_has_no_defaults():
    def fields(model, prefix=""):
        for name, field in model.model_fields.items():
            yield prefix + name, field
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from fields(field.annotation, f"{prefix}{name}.")

    with_default = [name for name, field in fields(Params) if not field.is_required()]
    assert with_default == []


def test_null_stride_and_peak_window_mean_the_presets():
    params = load_params(ROOT / "params.yaml", ["model.stride=16", "model.peak_window=0"])
    assert (params.model.stride, params.model.peak_window) == (16, 0)
    params = load_params(ROOT / "params.yaml", ["model.stride=null", "model.peak_window=null"])
    assert (params.model.stride, params.model.peak_window) == (None, None)


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

"""The done-balance check (`seqops data balance`)."""

import json

import pytest
import yaml
from conftest import ROOT

from seqops.cli import main
from seqops.config import SamplingConfig
from seqops.data.balance import (
    balance_of_counts,
    done_steps_per_image,
    report_balance,
    research_done_share,
    sampled_done_share,
)
from seqops.data.manifest import Record, write_manifest


def _dataset(tmp_path, counts, split="train"):
    records = [
        Record(id=str(i), image=f"images/{split}/{i}.png", points=tuple((j, j) for j in range(n)))
        for i, n in enumerate(counts)
    ]
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_manifest(tmp_path / f"{split}.jsonl", records)
    return tmp_path


def test_done_steps_follow_the_training_rule():
    assert done_steps_per_image(SamplingConfig(steps_per_image=8, done_share=0.2)) == 2
    assert done_steps_per_image(SamplingConfig(steps_per_image=8, done_share=0.0)) == 1
    assert done_steps_per_image(SamplingConfig(steps_per_image=8, done_share=1.0)) == 8
    assert done_steps_per_image(SamplingConfig(steps_per_image=20, done_share=0.01)) == 1


def test_shares_under_both_samplings():
    sampling = SamplingConfig(steps_per_image=8, done_share=0.2)
    assert sampled_done_share([10, 20, 30], sampling) == 0.25
    # An image without objects only has done steps.
    assert sampled_done_share([0, 10], sampling) == pytest.approx((1 + 0.25) / 2)
    assert research_done_share([0, 1, 3]) == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)
    assert sampled_done_share([], sampling) is None and research_done_share([]) is None


def test_no_warning_when_positives_are_frequent(tmp_path):
    dataset = _dataset(tmp_path, [5, 21, 40])
    report = report_balance(dataset, "train", SamplingConfig(steps_per_image=8, done_share=0.2))
    assert report.warning is None
    assert report.num_images == 3 and report.objects_min == 5 and report.objects_max == 40
    assert report.objects_mean == pytest.approx(22)
    text = report.text()
    assert "25.0%" in text and "research sampling" in text and "WARNING" not in text


def test_warning_with_a_concrete_fix_when_positives_are_rare(tmp_path):
    dataset = _dataset(tmp_path, [20, 21, 22])
    rare = SamplingConfig(steps_per_image=20, done_share=0.0)  # 1 of 20 steps: 5 %
    report = report_balance(dataset, "train", rare)
    assert report.sampled_share == pytest.approx(0.05)
    assert report.warning is not None
    text = report.text()
    assert "WARNING" in text and "5.0%" in text
    assert "--set sampling.done_share=0.2" in text and "train.loss.pos_weight=19" in text


def test_the_research_sampling_is_reported_for_comparison():
    report = balance_of_counts([32] * 4, SamplingConfig(steps_per_image=8, done_share=0.2))
    assert report.research_share == pytest.approx(1 / 33)  # ~3 %, the research's finding
    assert "3.0%" in report.text()


def test_empty_split_warns_and_missing_manifest_is_an_error(tmp_path):
    sampling = SamplingConfig(steps_per_image=8, done_share=0.2)
    report = report_balance(_dataset(tmp_path, [], split="val"), "val", sampling)
    assert report.num_images == 0 and "no images" in report.warning
    # A split the dataset does not have is named, with the ones it has.
    with pytest.raises(ValueError, match=r"--split 'test': .* has the splits val$"):
        report_balance(tmp_path, "test", sampling)
    with pytest.raises(ValueError, match="no prepared splits"):
        report_balance(tmp_path / "nowhere", "train", sampling)


def test_a_done_share_below_one_step_still_gives_one_and_says_so(tmp_path):
    dataset = _dataset(tmp_path, [20, 21, 22])
    report = report_balance(dataset, "train", SamplingConfig(steps_per_image=8, done_share=0.0))
    assert report.sampled_share == pytest.approx(1 / 8)
    assert "done_share=0 -> 1 of 8 steps, at least one per image): 12.5%" in report.text()
    plain = report_balance(dataset, "train", SamplingConfig(steps_per_image=8, done_share=0.25))
    assert "at least one" not in plain.text()


def test_cli_prints_the_report(tmp_path, capsys):
    dataset = _dataset(tmp_path / "ds", [20, 21, 22])
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["sampling"] = {"steps_per_image": 20, "done_share": 0.0}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    assert main(["data", "balance", str(dataset), "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert "WARNING" in out and "sampling.done_share=0.2" in out
    code = main(["data", "balance", str(dataset), "--params", str(params),
                 "--set", "sampling.done_share=0.25"])  # fmt: skip
    assert code == 0 and "WARNING" not in capsys.readouterr().out


def test_cli_names_a_bogus_split_and_prints_json_on_request(tmp_path, capsys):
    dataset = _dataset(tmp_path / "ds", [20, 21, 22])
    assert main(["data", "balance", str(dataset), "--split", "bogus"]) == 2
    assert "--split 'bogus': " in capsys.readouterr().err
    assert main(["data", "balance", str(dataset), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "train" and report["num_images"] == 3

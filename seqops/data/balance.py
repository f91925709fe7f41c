"""The done-balance check: how often does training see ``done = 1``?

Training draws ``sampling.steps_per_image`` steps from each image's sequence of
``N`` objects; a step marks ``k`` objects and asks for the next one, and
``k = N`` is the only step whose target is ``done = 1``. Per image,
``n_done = max(1, round(done_share * steps_per_image))`` of the steps take
``k = N`` and the others a ``k`` below ``N`` (an image with no objects is all
done steps). The research code drew one uniform ``k`` in ``[0, N]`` per image,
so positives had probability ``1 / (N + 1)``: 3 % of examples on its data, too
rare for the done head to learn. ``seqops data balance`` prints both shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from seqops.config import SamplingConfig
from seqops.data.manifest import DatasetError, manifest_path, read_manifest
from seqops.data.sampling import done_steps

RARE_SHARE = 0.10  # below this share of done = 1 examples, the report warns
SUGGESTED_DONE_SHARE = 0.2


def done_steps_per_image(sampling: SamplingConfig) -> int:
    """How many of an image's ``steps_per_image`` steps have ``k = N`` (done = 1)."""
    return done_steps(sampling.steps_per_image, sampling.done_share)


def sampled_done_share(counts: Sequence[int], sampling: SamplingConfig) -> float | None:
    """Share of done = 1 training examples under ``sampling``; None without images."""
    if not counts:
        return None
    share = done_steps_per_image(sampling) / sampling.steps_per_image
    # Every image contributes steps_per_image examples; one without objects is all done.
    return sum(1.0 if n == 0 else share for n in counts) / len(counts)


def research_done_share(counts: Sequence[int]) -> float | None:
    """Share of done = 1 examples when each image gives one uniform ``k`` in ``[0, N]``."""
    if not counts:
        return None
    return sum(1.0 / (n + 1) for n in counts) / len(counts)


@dataclass(frozen=True)
class BalanceReport:
    """Done balance of one prepared split under the training sampling settings."""

    dataset_dir: str
    split: str
    num_images: int
    objects_mean: float
    objects_min: int
    objects_max: int
    steps_per_image: int
    done_share_setting: float  # sampling.done_share
    done_steps: int  # steps per image with k = N
    sampled_share: float | None  # share of done = 1 examples under these settings
    research_share: float | None  # the same under the research's sampling
    warning: str | None

    def to_dict(self) -> dict:
        return asdict(self)

    def _floor_note(self) -> str:
        # The sampler never drops an image's done step (seqops.data.sampling.done_steps), so
        # a done_share below 1/steps_per_image still gives one: say so, or the figure surprises.
        if self.done_steps > round(self.done_share_setting * self.steps_per_image):
            return ", at least one per image"
        return ""

    def text(self) -> str:
        """A human-readable report (what ``seqops data balance`` prints)."""
        lines = [f"done balance of {self.dataset_dir} [{self.split}]: {self.num_images} images"]
        if self.num_images:
            lines += [
                f"  objects per image: mean {self.objects_mean:.1f}, "
                f"min {self.objects_min}, max {self.objects_max}",
                f"  done=1 share, training sampling (steps_per_image={self.steps_per_image}, "
                f"done_share={self.done_share_setting:g} -> {self.done_steps} of "
                f"{self.steps_per_image} steps{self._floor_note()}): {self.sampled_share:.1%}",
                "  done=1 share, research sampling (one uniform k in [0, N] per image): "
                f"{self.research_share:.1%}",
            ]
        lines.append(f"  WARNING: {self.warning}" if self.warning else "  OK: positives not rare")
        return "\n".join(lines)


def balance_of_counts(
    counts: Sequence[int], sampling: SamplingConfig, dataset_dir: str = "", split: str = ""
) -> BalanceReport:
    """Build a :class:`BalanceReport` from objects-per-image counts."""
    sampled = sampled_done_share(counts, sampling)
    warning = None
    if not counts:
        warning = f"split {split!r} has no images: nothing to train on"
    elif sampled < RARE_SHARE:
        better = SamplingConfig(
            steps_per_image=sampling.steps_per_image,
            done_share=max(SUGGESTED_DONE_SHARE, sampling.done_share),
        )
        pos_weight = (1 - sampled) / sampled
        warning = (
            f"done=1 examples are rare ({sampled:.1%} < {RARE_SHARE:.0%}); the done head will "
            f"learn to answer 'not done'. Fix: raise sampling.done_share to "
            f"{better.done_share:g} (`--set sampling.done_share={better.done_share:g}`, "
            f"giving {sampled_done_share(counts, better):.0%}), or weight positives with "
            f"`--set train.loss.pos_weight={pos_weight:.0f}`"
        )
    return BalanceReport(
        dataset_dir=dataset_dir,
        split=split,
        num_images=len(counts),
        objects_mean=sum(counts) / len(counts) if counts else 0.0,
        objects_min=min(counts, default=0),
        objects_max=max(counts, default=0),
        steps_per_image=sampling.steps_per_image,
        done_share_setting=sampling.done_share,
        done_steps=done_steps_per_image(sampling),
        sampled_share=sampled,
        research_share=research_done_share(counts),
        warning=warning,
    )


def require_split(dataset_dir: str | Path, split: str) -> None:
    """Fail, naming the split and the dataset's splits, when ``split`` is not one of them."""
    splits = sorted(p.stem for p in Path(dataset_dir).glob("*.jsonl"))
    if not splits:
        raise DatasetError(f"{dataset_dir}: no prepared splits (run `seqops prepare` first)")
    if split not in splits:
        raise DatasetError(f"--split {split!r}: {dataset_dir} has the splits {', '.join(splits)}")


def report_balance(dataset_dir: str | Path, split: str, sampling: SamplingConfig) -> BalanceReport:
    """Report the done balance of ``split`` of a prepared dataset under ``sampling``."""
    require_split(dataset_dir, split)
    records = read_manifest(manifest_path(dataset_dir, split))
    counts = [r.num_objects for r in records]
    return balance_of_counts(counts, sampling, str(dataset_dir), split)

"""The README's commands, run the way a user types them: a README example that stops working
fails here.

- the serving section's shell block (curl included) against a real `seqops serve` process;
- "Your first hour": `seqops predict` on the sample image, and the own-data walk-through
  (prepare, stats, train, export, predict) on `examples/fsc147`;
- "Reproducing with DVC": the documented set-up (`source .venv/bin/activate`), `dvc repro`,
  the metrics and `seqops plots`, in a fresh git + DVC repo of the project with tiny params.

The tests run in a scratch folder that links the repository's `examples/` (and `.venv/`),
so the README's relative paths work as written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, exported_model

README = ROOT / "README.md"
BIN = ROOT / ".venv" / "bin"


def section(title: str) -> str:
    """The README's text under the heading ``title``, to the next heading of its level or
    above (a ``#`` inside a code block is a shell comment, not a heading)."""
    lines, found, level, fenced = [], False, 0, False
    for line in README.read_text().splitlines(keepends=True):
        fenced ^= line.startswith("```")
        heading = re.match(r"(#+) (.*)", line) if not fenced else None
        if found and heading and len(heading.group(1)) <= level:
            break
        if found:
            lines.append(line)
        elif heading and heading.group(2).strip() == title:
            found, level = True, len(heading.group(1))
    assert found, f"README has no section {title!r}"
    return "".join(lines)


def bash_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block: continuation lines joined, comments and blank
    lines left out."""
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        commands = [line.strip() for line in joined.splitlines()]
        blocks.append([c for c in commands if c and not c.startswith("#")])
    return blocks


def shell(command: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300):
    """Run ``command`` with bash in ``cwd``, the venv's tools first on PATH."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    full_env.pop("SEQOPS_MODEL", None)  # the README's defaults, not the caller's
    full_env.update(env or {})
    proc = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def script(commands: list[str]) -> str:
    """One bash script of ``commands`` (each may end in a comment) that stops at the first
    failure and writes its errors where its output goes (DVC logs to stderr)."""
    body = "\n".join(commands)
    return f"exec 2>&1\nset -e\n{body}"


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A folder where the README's relative paths (examples/...) resolve."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    return tmp_path


@pytest.mark.e2e
def test_the_serving_block_runs_against_a_real_server(scratch: Path):
    from serving.serve_fixtures import Server, serve_model

    commands = bash_blocks(section("Serving"))[0]
    assert commands[0].startswith("seqops serve &")  # started below, on a free port
    server = Server(serve_model(), scratch / "server.log")
    try:
        server.wait_ready()
        answers = []
        for command in commands[1:]:
            command = command.replace("http://127.0.0.1:8000", server.base)
            answers.append((command, shell(command, scratch)))
    finally:
        server.stop()
    curls = [(c, out) for c, out in answers if c.startswith("curl")]
    assert len(curls) == 5
    for command, out in curls:
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert records, command
        last = records[-1]
        assert "error" not in last and "detail" not in last, (command, last)

    def answer(part: str) -> str:
        """The output of the one curl command holding ``part``."""
        (out,) = [out for c, out in curls if part in c]
        return out

    predict = json.loads(answer("/predict?max_objects=100'"))
    assert predict["count"] == 100 and predict["model"]["version"] == "test-never"
    assert json.loads(answer("-F file=@image.png"))["count"] > 0  # the multipart upload
    stream = [json.loads(line) for line in answer("/predict/stream").splitlines()]
    assert len(stream) > 1 and "count" in stream[-1]
    step = json.loads(answer("/next"))
    assert step["index"] == 2 and {"x", "y", "done_prob", "done"} <= set(step)
    infer = json.loads(answer("/v2/models/seqops/infer"))
    assert infer["id"] == "1" and infer["model_version"] == "test-never"


def test_predict_on_the_sample_image_says_which_model_answered(scratch: Path):
    command = next(
        c for block in bash_blocks(section("Your first hour")) for c in block
        if c.startswith("seqops predict examples/scene.png --out")
    )  # fmt: skip
    model = str(exported_model("done")[0])
    out = shell(command, scratch, env={"SEQOPS_MODEL": model})
    result = json.loads(out)
    assert result["image"] == "examples/scene.png" and result["count"] == 0
    assert result["model"] == {
        "name": "seqops", "version": "test-done", "source": model, "confidence_calibrated": False,
    }  # fmt: skip
    assert (scratch / "outputs" / "predict" / "scene.png").is_file()
    truth = json.loads((ROOT / "examples" / "scene.points.json").read_text())
    assert truth["count"] == len(truth["points"]) == 18  # the README's "18 true points"


@pytest.mark.slow
@pytest.mark.e2e
def test_the_own_data_walk_through_runs_as_written(scratch: Path):
    (commands,) = [b for b in bash_blocks(section("Your first hour")) if "seqops prepare" in b[0]]
    (scratch / "params.yaml").symlink_to(ROOT / "params.yaml")  # read, never written
    outputs = [shell(command, scratch) for command in commands]
    stats = outputs[1].splitlines()
    assert stats[0].startswith("outputs/mine/data: 6 images") and "source fsc147" in stats[0]
    prediction = json.loads(outputs[-1])
    assert prediction["count"] <= 30 and prediction["model"]["source"] == "outputs/mine/onnx"
    assert not (scratch / "metrics").exists()  # the pipeline's outputs were left alone


@pytest.mark.slow
@pytest.mark.e2e
def test_dvc_repro_with_the_documented_set_up(tmp_path: Path):
    from pipeline.flow_fixtures import TINY_PIPELINE, make_project_workspace

    from seqops.params_file import write_overrides

    repo = make_project_workspace(tmp_path / "clone")
    write_overrides(TINY_PIPELINE, repo / "params.yaml")
    (repo / ".venv").symlink_to(ROOT / ".venv")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "PATH": "/usr/bin:/bin"}
    repro, metrics = bash_blocks(section("Reproducing with DVC"))
    out = shell(script(repro), repo, env=env)
    assert "Running stage 'evaluate'" in out
    assert repro[0].startswith("source .venv/bin/activate")
    assert [c.split("#")[0].split()[:3] for c in metrics] == [
        ["dvc", "metrics", "show"], ["dvc", "metrics", "diff"], ["dvc", "metrics", "show"],
        ["seqops", "plots"],
    ]  # fmt: skip
    out = shell(script([repro[0], metrics[0]]), repo, env=env)  # the same shell session
    header, row = [line for line in out.splitlines() if line.strip()][-2:]
    assert header.split()[:3] == ["Path", "count_bias", "count_confidence_ece"]
    # The headline figures only (DVC leaves out the undefined ones, null on this tiny model).
    assert row.startswith("metrics/evaluate.json") and 8 <= len(header.split()) <= 15
    out = shell(script([repro[0], metrics[1]]), repo, env=env)
    figures = [line for line in out.splitlines() if line.startswith("metrics/evaluate.json")]
    assert 10 <= len(figures) <= 14  # one line a figure (new here, as nothing is committed)
    shell(script([repro[0], *metrics[2:]]), repo, env=env)
    pngs = sorted(p.name for p in (repo / "reports" / "plots").iterdir())
    assert len(pngs) == 7 and "review_curve.png" in pngs

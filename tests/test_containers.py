"""The images build and run: the serve image on a locally made base, checked with podman.

No Docker engine here: ``scripts/container-tools.sh`` installs buildah/podman/runc and makes
the Debian base image (idempotent), then builds ``docker/serve.Dockerfile`` with buildah. The
tests run the real image: the CLI, the torch-free environment, the predictor on a real ONNX
model mounted into the container, and, once ``seqops serve`` exists, ``POST /predict`` over a
published port. The train image is big: its build runs only with SEQOPS_TEST_TRAIN_IMAGE=1.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import exported_model, free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "container-tools.sh"
BASE_IMAGE = os.environ.get("SEQOPS_BASE_IMAGE", "localhost/seqops-base:bookworm")
SERVE_IMAGE = "localhost/seqops-serve:test"
TRAIN_IMAGE = "localhost/seqops-train:test"
# The tiny model's constant answer (normalised x, y): one object at (62.5 %, 25 %) of the image.
MODEL_XY = (0.25, -0.5)

pytestmark = [pytest.mark.e2e, pytest.mark.containers]


def run(
    cmd: list[str], timeout: float = 600, check: bool = True, **kwargs
) -> subprocess.CompletedProcess:
    """Run a command; on failure the assertion shows its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        output = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{output}"
    return proc


@functools.cache
def run_flags() -> list[str]:
    """The ``podman run`` flags that work on this kind of VM, as the script defines them."""
    return run([str(SCRIPT), "run-flags"]).stdout.split()


def podman_run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``podman run --rm`` with the flags that work here."""
    return run(["podman", "run", "--rm", *run_flags(), *args], timeout=timeout)


def make_readable(model_dir: Path) -> None:
    """The container runs as uid 10001: the mounted files must be readable by others."""
    for path in (model_dir, *model_dir.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)


def predict_in_image(serve_image: str, model_dir: Path, image_path: Path, script: str) -> dict:
    """Run ``script`` in the image with the model at /models/seqops and the image at
    /data/blue.png; its last output line, as JSON."""
    out = podman_run(
        "-v", f"{model_dir}:/models/seqops:ro",
        "-v", f"{image_path}:/data/blue.png:ro",
        "--entrypoint", "python3", serve_image, "-c", script,
    ).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def write_tiny_model(model_dir: Path, image_size: int = 64, grid: int = 8) -> Path:
    """A real ONNX export in the seqops layout whose behaviour is known exactly.

    The encoder average-pools the image onto the grid; the step always proposes ``MODEL_XY``
    and says done once anything is marked (done = sigmoid(10 (sum(marks) - 0.5))). So the
    predictor loop must find exactly one object, at a known place: a wrong mark rendering,
    coordinate mapping or loop shows up as a wrong count or point.
    """
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    model_dir.mkdir(parents=True)
    meta = {
        "format": 1,
        "name": "seqops",
        "image_size": image_size,
        "grid": grid,
        "mark_sigma": 1.0,
        "exemplars": False,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "coordinates": "normalised [-1, 1]",
        "done_threshold": 0.5,
        "order": "reading_order",
        "row_height": 50,
        "preset": "container-test",
        "model_version": "container-test",
        "run_id": None,
    }
    feat = ["B", 3, grid, grid]
    pool = image_size // grid
    encoder = helper.make_graph(
        [
            helper.make_node(
                "AveragePool",
                ["image"],
                ["features"],
                kernel_shape=[pool, pool],
                strides=[pool, pool],
            )
        ],
        "encoder",
        [
            helper.make_tensor_value_info(
                "image", TensorProto.FLOAT, ["B", 3, image_size, image_size]
            )
        ],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, feat)],
    )
    step = helper.make_graph(
        [
            # xy: the constant, broadcast to the batch through a zeroed feature sum.
            helper.make_node("ReduceSum", ["features", "axes123"], ["feature_sum"], keepdims=0),
            helper.make_node("Mul", ["feature_sum", "zero"], ["batch_zeros"]),
            helper.make_node("Unsqueeze", ["batch_zeros", "axis1"], ["batch_zeros_2d"]),
            helper.make_node("Add", ["batch_zeros_2d", "xy_const"], ["xy"]),
            helper.make_node("ReduceSum", ["marks", "axes123"], ["mark_sum"], keepdims=0),
            helper.make_node("Sub", ["mark_sum", "half"], ["mark_excess"]),
            helper.make_node("Mul", ["mark_excess", "gain"], ["done_logit"]),
            helper.make_node("Sigmoid", ["done_logit"], ["done"]),
        ],
        "step",
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, feat),
            helper.make_tensor_value_info("marks", TensorProto.FLOAT, ["B", 1, grid, grid]),
        ],
        [
            helper.make_tensor_value_info("xy", TensorProto.FLOAT, ["B", 2]),
            helper.make_tensor_value_info("done", TensorProto.FLOAT, ["B"]),
        ],
        initializer=[
            helper.make_tensor("xy_const", TensorProto.FLOAT, [1, 2], list(MODEL_XY)),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
            helper.make_tensor("gain", TensorProto.FLOAT, [], [10.0]),
            helper.make_tensor("axes123", TensorProto.INT64, [3], [1, 2, 3]),
            helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
        ],
    )
    for name, graph in (("encoder", encoder), ("step", step)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8  # readable by any onnxruntime >= 1.14
        helper.set_model_props(model, {"seqops": json.dumps(meta)})
        onnx.checker.check_model(model)
        onnx.save(model, model_dir / f"{name}.onnx")
    (model_dir / "model.json").write_text(json.dumps(meta))
    make_readable(model_dir)
    return model_dir


def write_png(path: Path, size: tuple[int, int] = (200, 100)) -> Path:
    from PIL import Image

    Image.new("RGB", size, (30, 90, 200)).save(path)
    path.chmod(0o644)
    return path


def expected_point(size: tuple[int, int]) -> list[float]:
    """``MODEL_XY`` in the original image's pixels (continuous coords, [-1, 1] -> [0, size])."""
    return [(MODEL_XY[0] + 1) / 2 * size[0], (MODEL_XY[1] + 1) / 2 * size[1]]


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def container_tools() -> None:
    """buildah/podman installed and the local base image made, or a skip that says why."""
    if not shutil.which("bash") or os.name != "posix":
        pytest.skip("container tests need Linux with bash")
    if os.geteuid() != 0:
        pytest.skip("container tests need root (rootful buildah/podman, debootstrap)")
    tools = run([str(SCRIPT), "tools"], timeout=900, check=False)
    if tools.returncode != 0:
        pytest.skip(f"cannot install buildah/podman/runc/debootstrap: {tools.stderr[-800:]}")
    # From here on a failure is a real error, not a missing tool.
    run([str(SCRIPT), "base"], timeout=1200, env={**os.environ, "SEQOPS_BASE_IMAGE": BASE_IMAGE})


@pytest.fixture(scope="session")
def serve_image(container_tools) -> str:
    """The serve image, built from the working tree (buildah's layer cache makes reruns quick)."""
    env = {**os.environ, "SEQOPS_BASE_IMAGE": BASE_IMAGE, "SEQOPS_SERVE_IMAGE": SERVE_IMAGE}
    run([str(SCRIPT), "serve"], timeout=1800, env=env)
    return SERVE_IMAGE


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "model")


# --- the serve image -----------------------------------------------------------------------


@pytest.mark.slow
def test_serve_image_is_torch_free_non_root_and_healthchecked(serve_image: str):
    out = podman_run("--entrypoint", "seqops", serve_image, "--help").stdout
    assert "usage: seqops" in out

    check = (
        "import importlib.util, os, onnxruntime, seqops, seqops.predictor;"
        "assert importlib.util.find_spec('torch') is None, 'torch in the serve image';"
        "print(os.getuid(), onnxruntime.get_available_providers())"
    )
    out = podman_run("--entrypoint", "python3", serve_image, "-c", check).stdout
    uid, providers = out.split(" ", 1)
    assert uid.strip() != "0", "the serve image must not run as root"
    assert "CPUExecutionProvider" in providers

    image = json.loads(run(["podman", "image", "inspect", serve_image]).stdout)[0]
    assert image["Config"]["User"] == "seqops"
    assert "8000/tcp" in image["Config"]["ExposedPorts"]
    assert image["Config"]["Entrypoint"][:2] == ["/bin/sh", "-c"]
    assert "/v2/health/ready" in " ".join(image["Healthcheck"]["Test"])
    # The default target serves the registry's champion (MLFLOW_TRACKING_URI set at run time).
    assert "SEQOPS_MODEL=models:/seqops@champion" in image["Config"]["Env"]


@pytest.mark.slow
def test_serve_image_runs_the_predictor_on_a_mounted_model(
    serve_image: str, model_dir: Path, tmp_path: Path
):
    """Before the server: onnxruntime in the image loads a model directory and loops to done."""
    image_path = write_png(tmp_path / "blue.png", (200, 100))
    script = (
        "import json; from seqops.predictor import Predictor;"
        "p = Predictor.load('/models/seqops');"
        "print(json.dumps({'provider': p.provider, **p.predict(['/data/blue.png'])[0].to_dict()}))"
    )
    result = predict_in_image(serve_image, model_dir, image_path, script)
    assert result["provider"] == "CPUExecutionProvider"
    assert result["count"] == 1
    assert result["stopped_by"] == "done"
    assert result["points"][0] == pytest.approx(expected_point((200, 100)), abs=0.5)


@pytest.mark.slow
def test_serve_image_matches_the_host_predictor_on_a_real_export(serve_image: str, tmp_path: Path):
    """A model from the export stage's own code answers the same in the image as on the host."""

    from seqops.predictor import Predictor

    exported_dir, _ = exported_model("plain")
    model_dir = tmp_path / "export"
    shutil.copytree(exported_dir, model_dir)
    make_readable(model_dir)
    image_path = write_png(tmp_path / "blue.png", (96, 64))
    host = Predictor.load(model_dir, device="cpu").predict([image_path], max_objects=4)[0]

    script = (
        "import json; from seqops.predictor import Predictor;"
        "p = Predictor.load('/models/seqops', device='cpu');"
        "print(json.dumps(p.predict(['/data/blue.png'], max_objects=4)[0].to_dict()))"
    )
    image = predict_in_image(serve_image, model_dir, image_path, script)
    assert image["count"] == host.count
    assert image["done_probs"] == pytest.approx(host.done_probs, abs=1e-3)
    flat = [v for point in image["points"] for v in point]
    assert flat == pytest.approx([v for point in host.points for v in point], abs=0.05)


def wait_ready(url: str, container: str, timeout: float = 180) -> None:
    """Poll readiness; fail early with the logs if the container exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        state = run(["podman", "inspect", "--format", "{{.State.Status}}", container], check=False)
        if state.stdout.strip() not in ("running", "created", "configured"):
            logs = run(["podman", "logs", container], check=False)
            pytest.fail(f"container exited ({state.stdout.strip()}):\n{logs.stdout}\n{logs.stderr}")
        time.sleep(1)
    logs = run(["podman", "logs", container], check=False)
    pytest.fail(f"{url} not ready after {timeout} s:\n{logs.stdout[-3000:]}\n{logs.stderr[-3000:]}")


@pytest.mark.slow
def test_serve_container_answers_predict(serve_image: str, model_dir: Path, tmp_path: Path):
    """The image's own entrypoint serves a mounted model on a published loopback port."""
    port = free_port()
    name = f"seqops-serve-test-{uuid.uuid4().hex[:8]}"
    run([
        "podman", "run", "-d", "--name", name, *run_flags(),
        "-p", f"127.0.0.1:{port}:8000",
        "-v", f"{model_dir}:/models/seqops:ro",
        "-e", "SEQOPS_MODEL=/models/seqops",
        serve_image,
    ])  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(f"{base}/v2/health/ready", name)
        # The image's HEALTHCHECK itself (run by hand: no systemd timers here).
        assert run(["podman", "healthcheck", "run", name], check=False).returncode == 0

        image_path = write_png(tmp_path / "blue.png", (200, 100))
        request = urllib.request.Request(
            f"{base}/predict",
            data=image_path.read_bytes(),
            headers={"Content-Type": "image/png"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            assert resp.status == 200
            body = json.loads(resp.read())
        assert body["count"] == 1
        assert body["points"][0] == pytest.approx(expected_point((200, 100)), abs=0.5)

        # SIGTERM reaches `seqops serve` as PID 1 (the entrypoint execs it): a clean exit.
        run(["podman", "stop", "--time", "30", name], timeout=60)
        code = run(["podman", "inspect", "--format", "{{.State.ExitCode}}", name]).stdout.strip()
        assert code == "0", run(["podman", "logs", name], check=False).stderr[-3000:]
    finally:
        run(["podman", "rm", "-f", name], check=False)


# --- the train image (big: only on request) ------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SEQOPS_TEST_TRAIN_IMAGE") != "1",
    reason="the train image is big; set SEQOPS_TEST_TRAIN_IMAGE=1 to build and check it",
)
def test_train_image_builds_with_torch_and_dvc(container_tools):
    env = {**os.environ, "SEQOPS_BASE_IMAGE": BASE_IMAGE, "SEQOPS_TRAIN_IMAGE": TRAIN_IMAGE}
    run([str(SCRIPT), "train"], timeout=3600, env=env)
    check = "import torch, seqops.model, seqops.predictor; print(torch.__version__)"
    assert "2.13.0" in podman_run(TRAIN_IMAGE, "python3", "-c", check).stdout
    assert "dvc" in podman_run(TRAIN_IMAGE, "dvc", "version").stdout.lower()
    # The image's workspace is a git + DVC project: a small `dvc repro` runs, then reruns nothing.
    shrink = (
        "s/num_train: 800/num_train: 6/; s/num_val: 100/num_val: 2/; s/num_test: 100/num_test: 2/"
    )
    script = f"sed -i '{shrink}' params.yaml && dvc repro prepare && dvc repro prepare"
    out = podman_run(TRAIN_IMAGE, "sh", "-c", script, timeout=600).stdout
    assert "Running stage 'prepare'" in out
    assert "didn't change" in out

"""`make demo`: the whole pipeline on the embedded defaults, then the served model over HTTP
(``/predict`` on a sample scene, and the counting page at ``/``).

1. The Prefect pipeline flow (ephemeral Prefect server, MLflow on ./mlflow.db, DVC):
   prepare -> train -> export -> evaluate -> promote.
2. `seqops serve` on the champion from the MLflow registry, on a loopback port.
3. A sample test image sent to POST /predict; the count, its confidence and the points
   printed beside the truth.
4. Where to look next.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from seqops.io import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATASET = ROOT / "data" / "prepared"


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"demo: the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"demo: the server was not ready within {timeout:.0f} s")


def post_image(url: str, path: Path) -> dict:
    request = urllib.request.Request(
        url, data=path.read_bytes(), headers={"Content-Type": "image/png"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def check_page(base: str) -> str:
    """The counting page at ``/`` and the script it loads: served, from the server alone."""
    with urllib.request.urlopen(f"{base}/", timeout=30) as response:
        html = response.read().decode()
    if "<script" not in html or "http://" in html.replace(base, "") or "https://" in html:
        raise SystemExit(f"demo: {base}/ is not the self-contained counting page")
    return f"{len(html)} bytes of HTML, no CDN"


def main() -> int:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    print("== 1/3 pipeline flow: prepare -> train -> export -> evaluate -> promote", flush=True)
    subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=ROOT, env=env, check=True)

    first = json.loads((DATASET / "test.jsonl").read_text().splitlines()[0])
    sample = DATASET / first["image"]
    out_dir = ROOT / "outputs" / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(sample, out_dir / "sample.png")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    print(f"\n== 2/3 serving models:/seqops@champion on {base}", flush=True)
    server = subprocess.Popen(
        [BIN / "seqops", "serve", "--model", "models:/seqops@champion", "--port", str(port)],
        cwd=ROOT,
        env=env,
    )
    try:
        wait_ready(f"{base}/v2/health/ready", server)
        print(f"\n== 3/3 POST {base}/predict  ({sample.relative_to(ROOT)})", flush=True)
        answer = post_image(f"{base}/predict", sample)
        page = check_page(base)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    keys = ("count", "count_confidence", "points", "model", "timings_ms")
    print(json.dumps({k: answer[k] for k in keys}))
    calibrated = "" if answer["model"]["confidence_calibrated"] else ", uncalibrated"
    print(
        f"\ncount: {answer['count']} (true: {len(first['points'])}), "
        f"confidence {answer['count_confidence']:.2f} that it is exact{calibrated}"
    )
    for i, (x, y) in enumerate(answer["points"], 1):
        print(f"  {i:3d}: ({x:7.1f}, {y:7.1f})")
    print(f"\nthe counting page at {base}/ answered ({page})")
    subprocess.run(
        [BIN / "seqops", "predict", str(sample), "--model", "models/onnx", "--out", str(out_dir)],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print(
        "\nWhere to look:\n"
        f"  annotated image   {out_dir.relative_to(ROOT)}/ (numbered points)\n"
        "  metrics           `dvc metrics show`, reports/evaluate/metrics.json (every figure)\n"
        "  plots             `.venv/bin/seqops plots` -> reports/plots/*.png\n"
        "  MLflow UI         make mlflow-ui   -> http://127.0.0.1:5000\n"
        "  Prefect UI        make prefect-server -> http://127.0.0.1:4200\n"
        f"  serve it yourself .venv/bin/seqops serve --model models:/seqops@champion"
        " --collect data/raw/collected\n"
        "  count and correct http://127.0.0.1:8000/ (README: Count, correct, collect)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

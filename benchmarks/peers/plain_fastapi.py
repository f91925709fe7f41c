"""Peer (a): what a user writes first, a plain FastAPI route around the predictor.

One request, one ``Predictor.predict`` call (encode, then step until done), no batching:
FastAPI runs the synchronous route in its thread pool, so concurrent requests share the
one onnxruntime session from several threads. Takes the load generator's request, a
multipart form with the image as ``file`` and ``max_objects``.

    .venv/bin/python benchmarks/peers/plain_fastapi.py --model DIR --port 8001
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI, File, Form, UploadFile

from seqops.predictor import Predictor


def create_app(model_dir: str) -> FastAPI:
    """The app: the predictor loaded once, ``POST /predict`` and ``GET /healthz``."""
    predictor = Predictor(model_dir, device="cpu")
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"live": True}

    @app.post("/predict")
    def predict(file: UploadFile = File(...), max_objects: int = Form(50)) -> dict:  # noqa: B008
        (prediction,) = predictor.predict([file.file.read()], max_objects=max_objects)
        return prediction.to_dict()

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

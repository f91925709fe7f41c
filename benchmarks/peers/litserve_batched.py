"""Peer (b): LitServe with its own request batching around the same predictor.

LitServe gathers up to ``max_batch_size`` requests (waiting at most ``batch_timeout`` s for
them), hands the batch to ``predict`` in its inference worker process, and answers each
request from ``unbatch``. A batch runs ``Predictor.predict`` once per ``max_objects`` it
holds (the predictor takes one limit per call): images with the same limit are encoded
and stepped together, and the batch answers when its last image is done. Takes the load
generator's request, a multipart form with the image as ``file`` and ``max_objects``.

    .venv/bin/python benchmarks/peers/litserve_batched.py --model DIR --port 8002
"""

from __future__ import annotations

import argparse

import litserve as ls

from seqops.predictor import Predictor


class CountAPI(ls.LitAPI):
    """Decode the form, count a batch, answer each request with its prediction."""

    def __init__(self, model_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        self.predictor = Predictor(self.model_dir, device="cpu")

    def decode_request(self, request) -> tuple[bytes, int]:
        return request["file"].file.read(), int(request.get("max_objects", 50))

    def batch(self, inputs: list[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
        return inputs

    def predict(self, batch: list[tuple[bytes, int]]) -> list[dict]:
        answers: list[dict] = [{}] * len(batch)
        for limit in sorted({max_objects for _, max_objects in batch}):
            indices = [i for i, (_, max_objects) in enumerate(batch) if max_objects == limit]
            images = [batch[i][0] for i in indices]
            predictions = self.predictor.predict(images, max_objects=limit)
            for i, prediction in zip(indices, predictions, strict=True):
                answers[i] = prediction.to_dict()
        return answers

    def unbatch(self, output: list[dict]) -> list[dict]:
        return output

    def encode_response(self, output: dict) -> dict:
        return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.01, help="seconds")
    args = parser.parse_args()
    api = CountAPI(args.model, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()

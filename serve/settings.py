"""Server settings: validated once when the server is built, passed down explicitly.

``seqops serve`` fills them from its flags. With ``--workers N`` uvicorn starts N fresh
processes that import :func:`serve.app.create_app_from_env`; the settings reach
them as JSON in :data:`SETTINGS_ENV`, so every worker runs exactly what the command said.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from seqops.contract import DEFAULT_MAX_OBJECTS

SETTINGS_ENV = "SEQOPS_SERVE_SETTINGS"
DEFAULT_MODEL_URI = "models:/seqops@champion"
DEFAULT_API_KEY_ENV = "SEQOPS_API_KEY"
MIB = 1024 * 1024
SHUTDOWN_MARGIN_S = 2.0  # in-flight requests are answered this long before shutdown ends


class ServeSettings(BaseModel):
    """Everything the HTTP service needs besides the request itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = DEFAULT_MODEL_URI  # a model directory or an MLflow URI
    model_version: str | None = None  # the registry version, when the CLI resolved a URI
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")
    threads: int = Field(0, ge=0)  # onnxruntime intra-op threads; 0: cores / workers / run_threads
    workers: int = Field(1, ge=1)
    spin: bool = False
    # Step-level batching: up to max_active images loop together (1 = one request at a
    # time), stepped in onnxruntime runs of run_batch images (0: 64 on CUDA; on a CPU
    # the size with the least step time per image, measured at start).
    max_active: int = Field(32, ge=1, le=1024)
    run_batch: int = Field(0, ge=0, le=1024)
    # Fair share: a request is charged this share of its encoding (in steps) besides its
    # steps, and the least charged step first; 0: every image steps every turn (short
    # requests first), 1: equal compute per request (serve/batcher.py).
    encode_share: float = Field(0.5, ge=0, le=1)
    # onnxruntime runs of a turn that go at once, each in its own thread; 0: the cores per
    # worker on a CPU (one onnxruntime thread each), 1 on CUDA.
    run_threads: int = Field(0, ge=0, le=64)
    # Requests admitted but not yet stepping (decoding + waiting); beyond it: 429.
    max_queue: int = Field(32, ge=1)
    queue_full_status: int = 429  # or 503, for clients that only retry on 503
    deadline_s: float = Field(30.0, gt=0)  # per-request default; requests may ask for less
    max_deadline_s: float = Field(60.0, gt=0)
    # SIGTERM: finish in-flight requests for up to this long. Requests still running
    # SHUTDOWN_MARGIN_S before the end are answered 503 with their points so far, so it
    # must exceed the largest deadline by that margin (a request admitted just before
    # SIGTERM can still reach its own deadline).
    graceful_timeout_s: float = Field(65.0, gt=0)
    max_connections: int = Field(256, ge=1)  # open connections (idle too); beyond: 503
    keep_alive_s: float = Field(5.0, gt=0)  # an idle connection (also a silent new one) closes
    max_body_bytes: int = Field(20 * MIB, ge=1024)
    body_timeout_s: float = Field(30.0, gt=0)  # headers, then the whole body, within this, else 408
    max_pixels: int = Field(40_000_000, ge=1)  # decoded width x height (decompression bombs)
    min_image_side: int = Field(16, ge=1)  # smaller images get 422: nothing to count there
    max_objects: int = Field(DEFAULT_MAX_OBJECTS, ge=1)  # per-request default
    max_objects_limit: int = Field(1000, ge=1)  # what a request may ask for
    decode_threads: int = Field(2, ge=1)  # image decoding/resizing, off the event loop
    api_key_env: str = DEFAULT_API_KEY_ENV  # bearer token required when this variable is set
    # POST /collect saves an image and its corrected points here (off when None); the
    # folder's total size stays under collect_max_mb (507 beyond, nothing written).
    collect_dir: str | None = None
    collect_max_mb: float = Field(1024.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        """Checks across fields, with messages that say which flags disagree."""
        if self.queue_full_status not in (429, 503):
            raise ValueError(f"queue_full_status: 429 or 503, got {self.queue_full_status}")
        if self.max_objects > self.max_objects_limit:
            raise ValueError(
                f"max_objects={self.max_objects} exceeds max_objects_limit={self.max_objects_limit}"
            )
        if self.max_deadline_s + SHUTDOWN_MARGIN_S > self.graceful_timeout_s:
            raise ValueError(
                f"max_deadline_s={self.max_deadline_s} + {SHUTDOWN_MARGIN_S} s exceeds"
                f" graceful_timeout_s={self.graceful_timeout_s}: a request could outlive shutdown"
            )
        if self.deadline_s > self.max_deadline_s:
            raise ValueError(
                f"deadline_s={self.deadline_s} exceeds max_deadline_s={self.max_deadline_s}"
            )
        return self

    @property
    def batching(self) -> bool:
        """Whether concurrent requests share step runs."""
        return self.max_active > 1

    def api_key(self) -> str | None:
        """The required bearer token, or None when the API is open."""
        return os.environ.get(self.api_key_env) or None

    def to_env(self) -> str:
        """JSON for :data:`SETTINGS_ENV`."""
        return self.model_dump_json()

    @classmethod
    def from_env(cls) -> ServeSettings:
        """The settings the ``seqops serve`` parent process put in :data:`SETTINGS_ENV`."""
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            raise ValueError(f"{SETTINGS_ENV} is not set: start the server with `seqops serve`")
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise ValueError(f"{SETTINGS_ENV}: invalid settings ({exc})") from None

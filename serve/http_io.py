"""HTTP plumbing shared by the routers: their dependencies (the service, the API key), body
limit, error format, reading image requests."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import zlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.schemas import ErrorResponse
from serve.service import ServeError, Service

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "application/octet-stream")
ERROR_RESPONSES = {
    code: {"model": ErrorResponse, "description": why}
    for code, why in {
        400: "undecodable image or body",
        401: "missing or wrong API key",
        413: "body or image too large",
        408: "the body did not arrive in time",
        415: "unsupported Content-Type, image format or pixel mode",
        422: "invalid parameters, or exemplars the model does not take / needs",
        429: "queue full; see Retry-After",
        503: "loading or shutting down",
        504: "deadline passed; the loop stopped between steps",
    }.items()
}


# --- route dependencies --------------------------------------------------------------------


def get_service(request: Request) -> Service:
    """The app's :class:`Service` (one per app, so several apps in one process stay apart)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]

# auto_error=False: a missing or non-bearer header is ours to answer (401 with our message),
# and the key is only checked when one is configured.
_bearer = HTTPBearer(
    auto_error=False,
    description="Required when the server's API key variable (SEQOPS_API_KEY) is set.",
)


def require_api_key(
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Bearer token check, active when the API key environment variable is set."""
    expected = service.settings.api_key()
    if expected is None:
        return
    token = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(token.encode(), expected.encode()):
        raise ServeError(
            401,
            "missing or wrong API key (Authorization: Bearer <key>)",
            {"WWW-Authenticate": "Bearer"},
        )


API_KEY = Depends(require_api_key)  # for a router's or a route's ``dependencies``


def answer_head(router: APIRouter) -> None:
    """``HEAD`` on every GET route of ``router`` (probes and load balancers send it; 405
    otherwise), as second routes kept out of the schema (one operation per method there
    would repeat operation ids). Call once the router's routes are defined."""
    for route in list(router.routes):
        if isinstance(route, APIRoute) and "GET" in route.methods:
            router.add_api_route(
                route.path.removeprefix(router.prefix), route.endpoint, methods=["HEAD"],
                include_in_schema=False,
                dependencies=route.dependencies, response_model=route.response_model,
                response_class=route.response_class,
            )  # fmt: skip


# --- OpenAPI --------------------------------------------------------------------------------


def image_body_doc(json_model: type[BaseModel]) -> dict:
    """OpenAPI for a body that is a raw image, a multipart upload, or JSON with base64."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "image/png": binary,
                "image/jpeg": binary,
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                },
                "application/json": {"schema": inline_schema(json_model)},
            },
        }
    }


def inline_schema(model: type[BaseModel]) -> dict:
    """``model``'s JSON schema with its definitions inlined, for a body FastAPI does not parse
    (OpenAPI resolves ``$ref`` from the document root, where the model's ``$defs`` are not)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


# --- body limit, errors ------------------------------------------------------------


class BodyLimitMiddleware:
    """413 for bodies over the limit: by Content-Length before reading anything, or while
    streaming a body without one (chunked), before it is all in memory. 408 for a body
    that has not fully arrived ``timeout_s`` after the request began (a stalled or trickled
    upload would otherwise hold its memory and its queue place for as long as it likes)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"body: larger than the limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await error_response(scope["path"], 413, message)(scope, receive, send)
            return
        seen = 0
        body_done = False
        started = False
        stop_at = asyncio.get_running_loop().time() + self.timeout_s

        async def limited_receive():
            nonlocal seen, body_done
            if body_done:  # after the body only a disconnect comes: no timeout on that
                return await receive()
            remaining = stop_at - asyncio.get_running_loop().time()
            try:
                msg = await asyncio.wait_for(receive(), max(remaining, 0.001))
            except TimeoutError:
                raise _BodyTimeout from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                body_done = not msg.get("more_body", False)
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return msg

        async def tracking_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await error_response(scope["path"], 413, message)(scope, receive, send)
        except _BodyTimeout:
            if not started:
                late = f"body: not received within {self.timeout_s:g} s"
                await error_response(scope["path"], 408, late)(scope, receive, send)


class RefuseWhenFull:
    """A full server answers a counting request (429 with ``Retry-After``, or the configured
    status) here, before routing, dependencies and validation: clients that retry at once
    then cost the server a few dict lookups each, not a request's worth of framework. The
    route's own admission stays the rule; this only answers early what it would answer.
    With an API key set, only a request bearing it is answered here (others get their 401
    from the route)."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        batcher = self.service.batcher
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and batcher is not None
            and batcher.full
            and _is_counting(scope["path"])
            and self._authorised(scope)
        ):
            status = self.service.settings.queue_full_status
            seconds = batcher.retry_after()
            message = f"server busy: the request queue is full; retry in {seconds} s"
            headers = {"Retry-After": str(seconds)}
            await error_response(scope["path"], status, message, headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        """The request bears the API key, or none is required."""
        expected = self.service.settings.api_key()
        if expected is None:
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return secrets.compare_digest(given, b"Bearer " + expected.encode())


def _is_counting(path: str) -> bool:
    """The routes that take a queue place."""
    if path in ("/predict", "/predict/stream", "/next"):
        return True
    return path.startswith("/v2/models/") and path.endswith("/infer")


class _BodyTooLarge(Exception):
    """Raised inside the app when the streamed body passes the limit."""


class _BodyTimeout(Exception):
    """Raised inside the app when the body has not arrived in time."""


def error_response(
    path: str, status: int, message: Any, headers=None, partial: dict | None = None
) -> JSONResponse:
    """The error answer in the format of the API ``path`` belongs to; ``partial``: what a
    loop stopped by its deadline or by shutdown had found (``{"count", "points"}``)."""
    # KServe clients expect {"error": ...}; the simple API uses FastAPI's {"detail": ...}.
    extra = {} if partial is None else {"partial": partial}
    if path.startswith("/v2"):
        if not isinstance(message, str):
            message = "; ".join(
                f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in message
            )
        return JSONResponse({"error": message, **extra}, status, headers=headers)
    return JSONResponse({"detail": message, **extra}, status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error, ours and FastAPI's (validation, 404, 405), in :func:`error_response`'s
    format."""

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return error_response(request.url.path, exc.status, exc.message, exc.headers, exc.partial)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(request.url.path, 422, _jsonable_errors(exc.errors()))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect):
        # The client left while sending its body: nobody reads this, but the metrics do.
        return error_response(request.url.path, 499, "client closed the request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(request.url.path, exc.status_code, exc.detail, exc.headers)


def _jsonable_errors(errors) -> list[dict]:
    """Validation errors without their (unserialisable) context."""
    return [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in errors
    ]


# --- reading requests ---------------------------------------------------------------------


async def read_image_request(request: Request, json_model: type) -> tuple[bytes, dict]:
    """The image bytes and the option fields of a raw, multipart or JSON body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        payload = parse_json(await read_body(request), "body")
        if not isinstance(payload, dict):
            raise ServeError(422, "body: expected a JSON object with an 'image' field")
        try:  # strict: JSON has real numbers and booleans, so `true` is no max_objects
            parsed = json_model.model_validate(payload, strict=True)
        except ValidationError as exc:
            raise RequestValidationError(_located(exc, "body")) from None
        try:
            data = base64.b64decode(parsed.image, validate=True)
        except (binascii.Error, ValueError):
            raise ServeError(400, "image: not valid base64") from None
        return data, parsed.model_dump(exclude={"image"}, exclude_unset=True)
    if ctype == "multipart/form-data":
        if _content_encoding(request) != "identity":
            raise ServeError(415, "Content-Encoding: a multipart body is sent uncompressed")
        form = await read_form(request)
        options = sorted(set(json_model.model_fields) - {"image"})
        upload = _the_upload(form, options)
        fields = {
            key: value
            for key, value in form.multi_items()
            if key != "file" and isinstance(value, str)
        }
        return await upload.read(), fields
    if ctype in IMAGE_TYPES or ctype.startswith("image/"):
        return await read_body(request), {}
    raise ServeError(
        415,
        f"Content-Type {ctype or '(none)'!r}: send image/png or image/jpeg, multipart/form-data"
        " with a 'file' part, or application/json {\"image\": <base64>}",
    )


# Form limits: one image, and a few option fields. Up to MAX_FORM_FILES uploads are parsed
# (the body limit bounds their bytes) so that a form with a file too many is answered with
# what it holds, not with the parser's "Too many files".
MAX_FORM_FILES = 4
MAX_FORM_FIELDS = 16


async def read_form(request: Request) -> FormData:
    """The multipart form, or a 4xx naming the limit it passes (Starlette says only "Too
    many files", with status 400, for a form that is well-formed but holds too much)."""
    try:
        return await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except StarletteHTTPException as exc:
        reason = str(exc.detail)
        if reason.startswith("Too many files"):
            raise ServeError(
                422, f"file: one image per request, got more than {MAX_FORM_FILES} file parts"
            ) from None
        if reason.startswith("Too many fields"):
            raise ServeError(
                422, f"form: at most {MAX_FORM_FIELDS} option fields, got more"
            ) from None
        raise ServeError(400, f"body: not a valid multipart form ({reason})") from None


def _the_upload(form: FormData, options: list[str]) -> UploadFile:
    """The form's one image, in its part named ``file``; a 422 naming the part otherwise
    (several images, an image under another name, an upload where an option's text goes)."""
    uploads = [(key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
    images = [value for key, value in uploads if key == "file"]
    accepted = f"'file' (the image) and the text fields {', '.join(options)}"
    if len(images) > 1:
        raise ServeError(422, f"file: one image per request, got {len(images)} file parts")
    for key, _ in uploads:
        if key in options:
            raise ServeError(422, f"{key}: expected a form field, got a file upload")
        if key != "file" and images:
            raise ServeError(422, f"{key}: a second file upload; the form takes {accepted}")
        if key != "file":
            raise ServeError(
                422, f"file: the image goes in a part named 'file', got a file upload named "
                f"{key!r}; the form takes {accepted}",
            )  # fmt: skip
    if not images:
        raise ServeError(
            422, f"file: a multipart upload named 'file' is required; the form takes {accepted}"
        )
    return images[0]


def _content_encoding(request: Request) -> str:
    """The request's Content-Encoding, lower case; ``identity`` when none."""
    return request.headers.get("content-encoding", "").strip().lower() or "identity"


async def read_body(request: Request) -> bytes:
    """The body, decompressed when ``Content-Encoding`` is gzip or deflate (as
    ``tritonclient``'s ``request_compression_algorithm`` sends it). The decompressed size is
    held to the body limit, so a small compressed bomb gets 413, not the memory."""
    body = await request.body()
    encoding = _content_encoding(request)
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ServeError(415, f"Content-Encoding {encoding!r}: send identity, gzip or deflate")
    limit = request.app.state.service.settings.max_body_bytes
    # 32 + 15: zlib detects the gzip or zlib header; HTTP's "deflate" is zlib-wrapped.
    inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ServeError(400, f"body: not valid {encoding} data ({exc})") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise ServeError(413, f"body: larger than the limit of {limit} bytes once decompressed")
    if not inflater.eof:
        raise ServeError(400, f"body: truncated {encoding} data")
    return data


def parse_json(data: bytes, where: str) -> Any:
    """``data`` as JSON, or a 400 naming ``where``: malformed, not UTF-8, or nested so deeply
    that the parser gives up (a ``RecursionError``, which would otherwise be a 500)."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ServeError(400, f"{where}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ServeError(400, f"{where}: JSON nested too deeply") from None


def _located(exc: ValidationError, where: str) -> list[dict]:
    """Validation errors located under ``where`` (``body``, ``options``), without the input
    value (it may be a whole base64 image, or an object whose repr means nothing)."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    return [{**e, "loc": (where, *e["loc"])} for e in errors]


def parse_options(model: type, query: dict, fields: dict):
    """Query parameters + body fields -> validated options (body fields win)."""
    given = {k: v for k, v in query.items() if v is not None} | fields
    try:
        return model.model_validate(given)
    except ValidationError as exc:
        raise RequestValidationError(_located(exc, "options")) from None

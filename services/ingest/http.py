"""Seed 004's response envelope, the error handlers that produce it, and the ASGI middleware
every request goes through (request id, traceparent, body-size limit, metrics)."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import ErrorCode, HeraldError
from shared.ids import new_request_id, new_traceparent
from shared.logging import request_id_var, traceparent_var
from shared.metrics import HTTP_DURATION, HTTP_REQUESTS

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def iso_z(value: datetime | None) -> str | None:
    """A time as answers show it: UTC, milliseconds, ``Z``."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z") if value else None


def envelope(data: Any = None, *, status_code: int = 200, headers: dict | None = None) -> JSONResponse:
    """A success answer: ``{code: 0, message: "success", data, request_id}``."""
    body = {"code": 0, "message": "success", "data": data, "request_id": request_id_var.get()}
    return JSONResponse(body, status_code=status_code, headers=headers)


def error_response(
    code: ErrorCode,
    message: str,
    *,
    http_status: int | None = None,
    errors: list[dict[str, str]] | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    """A failure answer: seed 004's envelope with ``data: null``, the offending fields in
    ``errors`` and a timestamp."""
    body: dict[str, Any] = {
        "code": int(code),
        "message": message,
        "data": None,
        "request_id": request_id_var.get(),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=http_status or code.http_status, headers=headers)


# pydantic puts the branch of a union into an error's location (``to.list[...].1``);
# the caller only needs the field path.
_TYPE_TAG = re.compile(r"\[|^function-|^constrained-|^(str|int|float|bool|list|dict|none)$")


M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M]) -> M:
    """Parse and validate a JSON body in one pass (pydantic-core parses the JSON itself).

    Hot endpoints use this instead of a FastAPI body parameter: FastAPI decodes the JSON with
    the stdlib and then validates the dict, which cost a measurable share of ingest's CPU.
    Errors leave through the same handler as FastAPI's own validation errors."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def patch_changes(body: BaseModel, *, nullable: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields a partial update (``PUT``/``PATCH``) gives, as JSON values: 400 / 1001 when it
    gives none (``field: body``) or gives ``null`` to one not in ``nullable`` (naming it)."""
    changes = body.model_dump(mode="json", exclude_unset=True)
    if not changes:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "nothing to change", field="body")
    for key, value in changes.items():
        if value is None and key not in nullable:
            raise HeraldError(ErrorCode.INVALID_PARAMS, "may not be null", field=key)
    return changes


def json_body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting ``model`` as the JSON body of a route that parses it
    with :func:`parse_body`; nested definitions are inlined."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def _field_name(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header") and not _TYPE_TAG.search(str(p))]
    return ".".join(parts) if parts else "body"


def _describe(err: dict) -> str:
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "request body is not valid JSON"
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        return "unknown field"
    msg = str(err.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


def install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, leaves as seed 004's envelope."""

    @app.exception_handler(HeraldError)
    async def _herald(_: Request, exc: HeraldError) -> JSONResponse:
        errors = [{"field": exc.field, "message": exc.message}] if exc.field else None
        message = f"{exc.field}: {exc.message}" if exc.field else exc.message
        return error_response(exc.code, message, http_status=exc.http_status, errors=errors)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field_name(e.get("loc", ())), "message": _describe(e)} for e in exc.errors()]
        if any(e["message"] == "request body is not valid JSON" for e in errors):
            errors = [{"field": "body", "message": "request body is not valid JSON"}]
        message = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return error_response(ErrorCode.INVALID_PARAMS, message, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {
            404: ErrorCode.NOT_FOUND,
            405: ErrorCode.METHOD_NOT_ALLOWED,
            401: ErrorCode.UNAUTHENTICATED,
            403: ErrorCode.FORBIDDEN,
        }.get(exc.status_code, ErrorCode.INVALID_PARAMS)
        return error_response(code, str(exc.detail), http_status=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        import logging

        logging.getLogger("herald.ingest").exception("unhandled error")
        return error_response(ErrorCode.INTERNAL_ERROR, ErrorCode.INTERNAL_ERROR.default_message)


class RequestContextMiddleware:
    """Request id and traceparent in, ``X-Request-ID`` out, body size bounded, metrics counted.

    Pure ASGI (not BaseHTTPMiddleware) to keep the per-request cost small.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, exempt_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Routes that stream their body and bound it themselves (attachment uploads).
        self.exempt_paths = frozenset(exempt_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID.match(incoming) else new_request_id()
        tp = headers.get("traceparent", "")
        traceparent = tp if _TRACEPARENT.match(tp) else new_traceparent()
        rid_token = request_id_var.set(request_id)
        tp_token = traceparent_var.set(traceparent)
        scope.setdefault("state", {})
        scope["state"]["request_id"] = request_id
        scope["state"]["traceparent"] = traceparent
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if scope["path"] in self.exempt_paths:
                await self.app(scope, receive, send_with_id)
                return
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                await self._too_large(send_with_id)
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(receive)
                if body is None:
                    await self._too_large(send_with_id)
                    return
                receive = _replay(body)
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            HTTP_REQUESTS.labels(path, scope["method"], str(status_holder["status"])).inc()
            HTTP_DURATION.labels(path, scope["method"]).observe(time.perf_counter() - started)
            request_id_var.reset(rid_token)
            traceparent_var.reset(tp_token)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _too_large(self, send: Send) -> None:
        response = error_response(
            ErrorCode.INVALID_PARAMS,
            f"body: request body exceeds the limit of {self.max_body_bytes} bytes",
            http_status=413,
            errors=[{"field": "body", "message": f"larger than {self.max_body_bytes} bytes"}],
        )
        await response({"type": "http"}, _empty_receive, send)


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}

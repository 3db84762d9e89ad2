"""The replica's HTTP layer: the FastAPI app, its error bodies, and the checks every request body passes
(content type, size, UTF-8, JSON, schema, text limits) before any model work.

Every error answers `{"error": ...}` with its status; a 503 carries Retry-After. Bad input is never a 500.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from serve_app.schemas import ErrorBody

# Seconds a client is asked to wait before retrying a 503 (Retry-After).
RETRY_AFTER_S = 1
# The request header whose value picks a canary's version: one key, one version (sticky per client).
ROUTING_KEY_HEADER = "x-routing-key"
MAX_ROUTING_KEY_CHARS = 256


class ApiError(Exception):
    """An answer other than 200, with `{"error": message}`. A 503 tells the client when to retry."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message

    def response(self) -> JSONResponse:
        headers = {503: {"Retry-After": str(RETRY_AFTER_S)}, 401: {"WWW-Authenticate": "Bearer"}}.get(self.status)
        return JSONResponse({"error": self.message}, status_code=self.status, headers=headers)


def require_bearer(request: Request, token: str | None, endpoint: str) -> None:
    """Let the request through only with `Authorization: Bearer <token>`: 401 without one, 403 with a
    wrong one, 403 where no token is configured (the endpoint is closed, not open). Checked before the
    body is read, so a refused request changes nothing."""
    if token is None:
        raise ApiError(
            403,
            f"{endpoint} is closed: no token is configured (serve.feedback.token_env, by default the variable "
            "SENTIMENT_FEEDBACK_TOKEN, or serve.feedback.token_file, where the replicas run)",
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, f"{endpoint} needs 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(403, f"{endpoint}: wrong token")


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """The request's JSON body, checked in the order that keeps bad input cheap: content type,
    size (413 before anything is parsed), UTF-8, JSON."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, f"Content-Type must be application/json (got '{ctype or 'none'}')")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"body is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except (ValueError, RecursionError) as err:
        # Valid JSON that Python refuses: nesting deeper than the recursion limit, integers longer
        # than the int digit limit. Still the client's input, never a 500.
        raise ApiError(400, f"JSON the server will not parse: {type(err).__name__}: {str(err)[:120]}") from None


def validated(model_cls, data: Any):
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()[:5]]
        raise ApiError(422, "; ".join(parts)) from None


def check_text(text: str, max_chars: int, where: str = "text") -> None:
    if not text.strip():
        raise ApiError(422, f"{where}: must not be empty or whitespace only")
    if len(text) > max_chars:
        raise ApiError(422, f"{where}: {len(text)} characters exceeds the limit of {max_chars}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, f"{where}: contains invalid Unicode (an unpaired surrogate)") from None


def body_schema(model_cls) -> dict:
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": model_cls.model_json_schema()}}}
    }


api = FastAPI(
    title="Sentiment classifier",
    description='DistilBERT sentiment classification served by Ray Serve. Errors answer `{"error": ...}`.',
    version="0.1.0",
)
ERRORS = {code: {"model": ErrorBody} for code in (400, 404, 413, 415, 422, 503, 504)}


@api.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return err.response()


@api.exception_handler(Exception)
async def _unexpected(_: Request, err: Exception) -> JSONResponse:
    return JSONResponse({"error": f"internal error: {type(err).__name__}"}, status_code=500)


def routing_key(request: Request) -> str | None:
    """The canary routing key a client sends (X-Routing-Key), if any; else each text's request id."""
    key = request.headers.get(ROUTING_KEY_HEADER)
    if key is not None and len(key) > MAX_ROUTING_KEY_CHARS:
        raise ApiError(422, f"{ROUTING_KEY_HEADER}: longer than {MAX_ROUTING_KEY_CHARS} characters")
    return key or None

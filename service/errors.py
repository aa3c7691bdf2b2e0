"""The one error shape of the API: ``{"error": {"code", "message"}}``, the message saying what to fix."""

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger(__name__)
# What FastAPI and Starlette say of a body they cannot parse (bytes that are no JSON, a broken multipart).
_UNPARSEABLE_BODY = frozenset({"There was an error parsing the body", "Invalid multipart data."})


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def not_found(kind: str, object_id: str) -> ApiError:
    # Also the answer for another tenant's object, so that ids cannot be probed.
    return ApiError(404, "not_found", f"{kind} '{object_id}' does not exist; check the id")


def invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


# The OpenAI-compatible routes answer errors as OpenAI's API does, so that its clients read them.
OPENAI_PATHS = ("/v1/images/", "/v1/models")
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The error in this API's shape, or in OpenAI's on its routes (where invalid input is 400)."""
    if not request.url.path.startswith(OPENAI_PATHS):
        return JSONResponse(error_body(code, message), status_code=status, headers=headers)
    status = 400 if status == 422 else status
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _format_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        # Drop the "body"/"query" prefix: users know fields, not FastAPI's locations.
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        where = ".".join(loc) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid value')}")
    return "; ".join(parts) or "the request is invalid"


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette's own Allow names the methods of the
    first route that matched the path only, so a path that several routes share (GET and DELETE
    of one id) lost the others."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE")
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(request, exc.status, exc.code, exc.message, exc.headers)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        phrase = HTTPStatus(exc.status_code).phrase
        code = getattr(exc, "code", None) or phrase.lower().replace(" ", "_").replace("-", "_")
        message = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else phrase
        headers = exc.headers
        if exc.status_code == 404:
            message = "no such route; see /docs for the API"
        elif exc.status_code == 400 and message in _UNPARSEABLE_BODY:
            code = "malformed_body"
            content_type = request.headers.get("content-type", "none")
            message = f"the body is not valid {content_type.split(';')[0]}; see /docs for what this route takes"
        elif exc.status_code == 405:
            allowed = _allowed_methods(request)
            headers = {**(headers or {}), "Allow": allowed}
            message = f"{request.method} is not served here; this path serves {allowed}"
        return error_response(request, exc.status_code, code, message, headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(request, 422, "invalid_request", _format_validation(exc))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request, 500, "internal", "internal error; retry later")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)

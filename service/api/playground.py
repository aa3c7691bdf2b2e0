"""The playground: a static page at ``/`` (HTML, CSS and JavaScript in ``service/playground/``, no
build step, nothing from elsewhere) that drives the public API with the tenant's key."""

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "playground"
# The page may talk to this gateway only, and load nothing from anywhere else.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


class _PlaygroundFiles(StaticFiles):
    """The page's files, each with the security headers (the page itself is also reachable here)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


@router.get("/")
def playground() -> FileResponse:
    return FileResponse(PLAYGROUND_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


def mount_playground(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/playground", _PlaygroundFiles(directory=PLAYGROUND_DIR), name="playground")

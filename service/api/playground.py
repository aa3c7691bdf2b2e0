"""The playground: a static page at ``/`` (HTML, CSS and JavaScript in ``service/playground/``, no
build step, nothing from elsewhere) that drives the public API with the tenant's key."""

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "playground"
# The page may talk to this gateway only, and load nothing from anywhere else.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def playground() -> FileResponse:
    return FileResponse(PLAYGROUND_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


def mount_playground(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/playground", StaticFiles(directory=PLAYGROUND_DIR), name="playground")

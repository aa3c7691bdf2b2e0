"""Bounds on request bodies (FastAPI sets none), answering in the API's error shape: one for
uploads (multipart forms), a far smaller one for every other body, which is JSON parsed whole in
memory (FastAPI parses a body without a content type as JSON too)."""

import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body

CODE = "content_too_large"


class BodyTooLarge(HTTPException):
    """An HTTPException, so that body parsing passes it on instead of calling the body malformed."""

    code = CODE

    def __init__(self, max_bytes: int, upload: bool = True) -> None:
        what = "fewer or smaller files" if upload else "a smaller JSON body"
        super().__init__(413, f"the request body is over {max_bytes} bytes; send {what} within it")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, max_json_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_json_bytes = max_json_bytes

    async def _refuse(self, send: Send, refusal: BodyTooLarge) -> None:
        body = json.dumps(error_body(CODE, refusal.detail)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        is_upload = headers.get(b"content-type", b"").split(b";")[0].strip().lower() == b"multipart/form-data"
        limit = self.max_bytes if is_upload else self.max_json_bytes
        refusal = BodyTooLarge(limit, upload=is_upload)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._refuse(send, refusal)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise refusal
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            # Chunked bodies have no length up front; they are cut off once they pass the limit.
            if not started:
                await self._refuse(send, refusal)

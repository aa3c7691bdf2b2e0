"""Object ids: random, time-ordered ULIDs. Never paths, so they are safe to join onto storage folders."""

import re

from ulid import ULID

_ID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


def new_id() -> str:
    return str(ULID())


def is_valid_id(value: str) -> bool:
    return bool(_ID.fullmatch(value))

"""Request rates, counted in Redis so that every gateway process counts together: per tenant (all
requests, and job submissions), and per client address for failed authentications (a key can
then not be guessed at speed). Sliding windows (``limits``); each refusal says when to retry."""

import math
import time

from limits import RateLimitItem, parse
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from service.core.redis_db import PREFIX
from service.core.settings import Settings
from service.errors import ApiError


class RateLimits:
    def __init__(self, settings: Settings) -> None:
        self._limiter = SlidingWindowCounterRateLimiter(RedisStorage(settings.redis_url, key_prefix=f"{PREFIX}:limits"))
        self._requests = parse(settings.rate_limit_requests)
        self._submissions = parse(settings.rate_limit_submissions)
        self._auth_failures = parse(settings.rate_limit_auth_failures)

    def _refusal(self, item: RateLimitItem, key: str, what: str) -> ApiError:
        reset = self._limiter.get_window_stats(item, key).reset_time
        retry_after = max(1, math.ceil(reset - time.time()))
        message = f"too many {what} (at most {item}); retry in {retry_after} s"
        return ApiError(429, "rate_limited", message, headers={"Retry-After": str(retry_after)})

    def check_address(self, address: str) -> None:
        """Refuses an address that failed to authenticate too often, whatever key it sends now."""
        if not self._limiter.test(self._auth_failures, f"auth:{address}"):
            raise self._refusal(self._auth_failures, f"auth:{address}", "failed authentications from your address")

    def count_auth_failure(self, address: str) -> None:
        self._limiter.hit(self._auth_failures, f"auth:{address}")

    def count_request(self, tenant_id: str) -> None:
        if not self._limiter.hit(self._requests, f"requests:{tenant_id}"):
            raise self._refusal(self._requests, f"requests:{tenant_id}", "requests")

    def count_submission(self, tenant_id: str) -> None:
        if not self._limiter.hit(self._submissions, f"submissions:{tenant_id}"):
            raise self._refusal(self._submissions, f"submissions:{tenant_id}", "job submissions")

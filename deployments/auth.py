"""Bearer-key checks for the Ingress: API keys for the OpenAI routes, admin keys for the rest.

Admin routes never fail open: with no admin keys configured they answer 403, unless the config
explicitly sets `admin_open` (meant for a local server bound to 127.0.0.1). API keys are refused
on admin routes. Keys are compared in constant time, against every configured key.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from vlora.deployments.openai_api import ApiError

_MISSING = "missing API key: send 'Authorization: Bearer <key>'"


def _bearer(headers) -> str | None:
    header = headers.get("authorization", "")
    if not header[:7].lower() == "bearer ":
        return None
    return header[7:].strip() or None


def _matches(key: str, keys: Iterable[bytes]) -> bool:
    given = key.encode()
    found = False
    for k in keys:  # no early exit: the time taken does not say which key (or how much of one) matched
        found |= hmac.compare_digest(given, k)
    return found


class KeyCheck:
    def __init__(self, api_keys: Iterable[str], admin_keys: Iterable[str], admin_open: bool = False,
                 admin_keys_env: str = "VLORA_ADMIN_KEYS"):
        self.api_keys = tuple(k.encode() for k in api_keys)
        self.admin_keys = tuple(k.encode() for k in admin_keys)
        self.admin_open = admin_open
        self.admin_keys_env = admin_keys_env

    def api(self, headers) -> None:
        """OpenAI routes: open when no API keys are set; else an API key (or an admin key)."""
        if not self.api_keys:
            return
        key = _bearer(headers)
        if key is None:
            raise ApiError(401, _MISSING, type="authentication_error", code="invalid_api_key")
        if not _matches(key, self.api_keys + self.admin_keys):
            raise ApiError(401, "incorrect API key provided", type="authentication_error", code="invalid_api_key")

    def admin(self, headers) -> None:
        """Admin routes (adapters, learning): an admin key; without admin keys, 403 unless admin_open."""
        if not self.admin_keys:
            if self.admin_open:
                return
            raise ApiError(403, f"admin routes are disabled: no admin keys are configured; set {self.admin_keys_env} "
                                "to a comma-separated list of admin keys (or admin_open: true in the config, for "
                                "a server only reachable from 127.0.0.1)", type="permission_error",
                           code="admin_disabled")
        key = _bearer(headers)
        if key is None:
            raise ApiError(401, "admin routes need an admin key: send 'Authorization: Bearer <admin key>'",
                           type="authentication_error", code="invalid_api_key")
        if _matches(key, self.admin_keys):
            return
        if _matches(key, self.api_keys):
            raise ApiError(403, "this API key cannot use admin routes; send an admin key", type="permission_error",
                           code="insufficient_permissions")
        raise ApiError(401, "incorrect admin key provided", type="authentication_error", code="invalid_api_key")

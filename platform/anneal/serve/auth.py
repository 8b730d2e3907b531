"""API keys of a ModelService's router: who may call the OpenAI endpoints, who the operational ones.

The router is given the *names* of environment variables (`AppArgs.api_keys_env`,
`AppArgs.admin_key_env`), never the keys: a Serve config or a RayService manifest names where
a key is, and each driver puts the value there (the kubelet from a Secret, `anneal run` from
its own environment; docs/serving.md). Keys are compared as SHA-256 digests with
`hmac.compare_digest`, against every accepted key, so the time taken says nothing about which
key, or how much of one, matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from anneal.serve.protocol import ApiError

#: Access levels, lowest first.
NONE, USER, ADMIN = "none", "user", "admin"


class AuthConfigError(RuntimeError):
    """A key variable the app names is not set in the router's process; the message names it."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def split_keys(value: str) -> list[str]:
    """The keys in one variable: separated by commas or newlines, surrounding spaces ignored."""
    return [k.strip() for k in value.replace("\n", ",").split(",") if k.strip()]


@dataclass(frozen=True)
class Keys:
    """The accepted keys, as digests. No keys at all: authentication is off, everything is open."""

    api: tuple[bytes, ...] = ()
    admin: bytes | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.api) or self.admin is not None

    @classmethod
    def of(cls, api: Sequence[str] = (), admin: str | None = None) -> "Keys":
        return cls(tuple(_digest(k) for k in api), _digest(admin) if admin else None)


def load_keys(api_vars: Sequence[str], admin_var: str | None, environ: Mapping[str, str]) -> Keys:
    """The keys the named variables hold.

    Args:
        api_vars: variables whose keys are accepted on the OpenAI endpoints (each may hold several).
        admin_var: the variable holding the admin key.
        environ: the process environment.

    Raises:
        AuthConfigError: a named variable is unset or empty. The router then refuses to start
            rather than serve without the keys it was told to require.
    """
    api: list[str] = []
    for var in api_vars:
        keys = split_keys(environ.get(var, ""))
        if not keys:
            raise AuthConfigError(f"auth: environment variable {var} (API keys) is not set in the router's process; "
                                  "set it where Ray runs (docs/serving.md, Authentication)")
        api.extend(keys)
    admin = None
    if admin_var:
        admin = environ.get(admin_var, "").strip()
        if not admin:
            raise AuthConfigError(f"auth: environment variable {admin_var} (admin key) is not set in the router's "
                                  "process; set it where Ray runs (docs/serving.md, Authentication)")
    return Keys.of(api, admin)


def bearer(headers: Mapping[str, str]) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (lower-case header names), or None."""
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def access(keys: Keys, headers: Mapping[str, str]) -> str:
    """`admin`, `user` or `none`: what the request's bearer key opens (`admin` when auth is off)."""
    if not keys.enabled:
        return ADMIN
    token = bearer(headers)
    if token is None:
        return NONE
    digest = _digest(token)
    is_admin = keys.admin is not None and hmac.compare_digest(digest, keys.admin)
    is_user = False
    for k in keys.api:  # every key, no early exit
        is_user |= hmac.compare_digest(digest, k)
    return ADMIN if is_admin else USER if is_user else NONE


def unauthorized(has_key: bool) -> ApiError:
    """401 in OpenAI's shape; the key sent is never echoed."""
    msg = ("Incorrect API key provided." if has_key else
           "You didn't provide an API key: send it in an Authorization header (Authorization: Bearer YOUR_KEY).")
    return ApiError(401, msg, type="invalid_request_error", code="invalid_api_key")


def check(keys: Keys, headers: Mapping[str, str], *, admin: bool, what: str = "this endpoint",
          param: str | None = None) -> str:
    """The request's access level, or the error that refuses it.

    Args:
        keys: the accepted keys.
        headers: the request headers (lower-case names).
        admin: the admin key is needed (operational endpoints, pinning a variant).
        what: what is refused, for the message.
        param: the field or header that asked for admin access (`model`, `x-anneal-variant`).

    Raises:
        ApiError: 401 `invalid_api_key` without a valid key; 403 `admin_key_required` with a
            valid API key where the admin key is needed.
    """
    level = access(keys, headers)
    if admin:
        if level == ADMIN:
            return level
        if level == USER:
            raise ApiError(403, f"{what} needs the admin key", type="invalid_request_error", param=param,
                           code="admin_key_required")
        raise unauthorized(bearer(headers) is not None)
    if level == NONE and keys.api:
        raise unauthorized(bearer(headers) is not None)
    return level


# ------------------------------------------------------------------ the operator's variables

#: The variables the operator gives the router for keys held in Secrets (never their values
#: in a manifest: a RayService's containers read them with `valueFrom.secretKeyRef`).
API_KEY_VAR = "ANNEAL_SERVE_API_KEY_{}"
ADMIN_KEY_VAR = "ANNEAL_SERVE_ADMIN_KEY"


@dataclass(frozen=True)
class SecretKeyEnv:
    """Where the router of an operator-run service finds its keys.

    Attributes:
        refs: variable ← (Secret, key), for the Ray containers (`anneal.runtime.secrets.SecretRef`).
        api_keys_env, admin_key_env: the `AppArgs` fields naming those variables.
    """

    refs: tuple = ()
    api_keys_env: tuple[str, ...] = ()
    admin_key_env: str | None = None

    def app_args(self) -> dict:
        return {"api_keys_env": list(self.api_keys_env), "admin_key_env": self.admin_key_env}


def secret_key_env(auth: object, api_secret_keys: Sequence[str]) -> SecretKeyEnv:
    """The variables of a spec's `auth` on Kubernetes (pure).

    Args:
        auth: the spec's `ServiceAuth` (or None: no keys).
        api_secret_keys: the keys (data names) of the `apiKeysSecret` Secret: every value is an
            API key, so there is one variable per key, in sorted order.

    Returns:
        A key given only as `apiKeysEnv` / `adminKeyEnv` is read from that variable as it is
        (then it must be set in the Ray cluster's containers by other means).
    """
    from anneal.runtime.secrets import SecretRef

    if auth is None:
        return SecretKeyEnv()
    refs: list[SecretRef] = []
    api_env: list[str] = []
    if auth.api_keys_secret:
        for i, key in enumerate(sorted(api_secret_keys)):
            refs.append(SecretRef(API_KEY_VAR.format(i), auth.api_keys_secret, key))
            api_env.append(API_KEY_VAR.format(i))
    elif auth.api_keys_env:
        api_env.append(auth.api_keys_env)
    admin_env = auth.admin_key_env
    if auth.admin_key_secret is not None:
        refs.append(SecretRef(ADMIN_KEY_VAR, auth.admin_key_secret.name, auth.admin_key_secret.key))
        admin_env = ADMIN_KEY_VAR
    return SecretKeyEnv(tuple(refs), tuple(api_env), admin_env)


__all__ = ["ADMIN", "ADMIN_KEY_VAR", "API_KEY_VAR", "NONE", "USER", "AuthConfigError", "Keys", "SecretKeyEnv",
           "access", "bearer", "check", "load_keys", "secret_key_env", "split_keys", "unauthorized"]

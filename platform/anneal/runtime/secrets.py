"""Values of `spec.ray.runtimeEnv.envVars`: which name a Secret, resolving them, and the spec without them.

A value is a plain string or `{secretKeyRef: {name, key}}`. Either may be a token, so the values
travel in the Ray runtime env only: everywhere else a spec goes (the job's command line, the
RayJob object, MLflow params) carries `redact_spec(spec)`, the same keys with every value
replaced by `REDACTED`. Each driver resolves a `secretKeyRef` its own way (the operator from the
Secret, `anneal run` from its own environment) through `resolve(runtime_env, lookup)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

#: Where the variables are written, for messages.
ENV_VARS_FIELD = "spec.ray.runtimeEnv.envVars"
#: What every envVars value becomes outside the runtime env.
REDACTED = "<redacted>"


@dataclass(frozen=True)
class SecretRef:
    """One variable whose value is key `key` of Secret `name` (in the resource's namespace)."""

    var: str
    name: str
    key: str

    @property
    def field(self) -> str:
        return f"{ENV_VARS_FIELD}.{self.var}"

    def env_entry(self) -> dict[str, Any]:
        """The container `env` entry that has the kubelet read the value (`valueFrom.secretKeyRef`)."""
        return {"name": self.var, "valueFrom": {"secretKeyRef": {"name": self.name, "key": self.key}}}


class Unresolved(Exception):
    """A `secretKeyRef` whose value cannot be had; the message names the field and why."""

    def __init__(self, ref: SecretRef, reason: str):
        self.ref, self.reason = ref, reason
        super().__init__(f"{ref.field}: {reason}")


def _env_vars(runtime_env: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (runtime_env or {}).get("envVars") or {}


def plain_env(runtime_env: Mapping[str, Any] | None) -> dict[str, str]:
    """The variables of a spec's `ray.runtimeEnv` (camelCase dict) written as plain strings."""
    return {k: str(v) for k, v in _env_vars(runtime_env).items() if not isinstance(v, Mapping)}


def secret_refs(runtime_env: Mapping[str, Any] | None) -> list[SecretRef]:
    """The variables of a spec's `ray.runtimeEnv` whose value comes from a Secret, by name."""
    out = []
    for var, value in sorted(_env_vars(runtime_env).items()):
        if isinstance(value, Mapping):
            ref = value["secretKeyRef"]
            out.append(SecretRef(var, ref["name"], ref["key"]))
    return out


def resolve(runtime_env: Mapping[str, Any] | None, lookup: Callable[[SecretRef], str]) -> dict[str, str]:
    """variable → value of every `secretKeyRef`, each read with `lookup`.

    Args:
        runtime_env: a spec's `ray.runtimeEnv` (camelCase dict).
        lookup: the driver's reader; raises `LookupError(reason)` when it has no value.

    Raises:
        Unresolved: the first variable `lookup` has no value for.
    """
    out = {}
    for ref in secret_refs(runtime_env):
        try:
            out[ref.var] = lookup(ref)
        except LookupError as exc:
            raise Unresolved(ref, str(exc.args[0]) if exc.args else "no value") from None
    return out


def redact_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A job spec (camelCase dict) with every `ray.runtimeEnv.envVars` value replaced by `REDACTED`.

    The keys stay (the job shows which variables it was given); nothing else is copied deeply.
    """
    out = dict(spec)
    ray = out.get("ray")
    if not isinstance(ray, Mapping) or not isinstance(ray.get("runtimeEnv"), Mapping):
        return out
    runtime_env = dict(ray["runtimeEnv"])
    if isinstance(runtime_env.get("envVars"), Mapping):
        runtime_env["envVars"] = {k: REDACTED for k in runtime_env["envVars"]}
    out["ray"] = {**ray, "runtimeEnv": runtime_env}
    return out


__all__ = ["ENV_VARS_FIELD", "REDACTED", "SecretRef", "Unresolved", "plain_env", "redact_spec", "resolve", "secret_refs"]

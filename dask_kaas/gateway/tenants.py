"""The tenants file: who may call the gateway, and with what share.

::

    tenants:
      alice: {token_sha256: "<hex sha256 of the bearer token>", weight: 2.0, max_in_flight: 64}
      bob:   {token_sha256: "<hex>"}
    operators:
      ops:   {token_sha256: "<hex>"}

The file holds digests, never tokens, so reading it does not let anyone call
the gateway.  A request's ``Authorization: Bearer <token>`` is hashed and
compared with *every* digest with :func:`hmac.compare_digest` (no early exit),
so neither the comparison nor the position of the match in the file shows in
the response time.  The tenant's name and weight come from this file only: a
caller cannot choose them.  A malformed file is refused as a whole (at start
the gateway does not start; on SIGHUP the previous file stays in force).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import TenantsFileError

#: Names of tenants, operators and models: safe in URLs, logs and Dask keys.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
MAX_FILE_BYTES = 1 << 20
MAX_ENTRIES = 10_000
MAX_WEIGHT = 1e6
MAX_IN_FLIGHT = 1_000_000
DEFAULT_MAX_IN_FLIGHT = 64
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_FIELDS = {"tenants": {"token_sha256", "weight", "max_in_flight"},
           "operators": {"token_sha256"}}


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a tenant (calls models) or an operator
    (manages the gateway and the pool)."""

    name: str
    role: str  # "tenant" or "operator"
    token_sha256: str
    weight: float = 1.0
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


def token_digest(token: str | bytes) -> str:
    """The hex SHA-256 the tenants file stores for ``token``."""
    raw = token.encode("utf-8") if isinstance(token, str) else bytes(token)
    return hashlib.sha256(raw).hexdigest()


def _number(value: Any, where: str, lo: float, hi: float, integer: bool = False) -> Any:
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        kind = "an integer" if integer else "a number"
        raise TenantsFileError(f"{where} must be {kind}, got {type(value).__name__}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise TenantsFileError(f"{where} must be in [{lo:g}, {hi:g}], got {value!r}")
    return value


def _entry(section: str, name: Any, fields: Any) -> Principal:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise TenantsFileError(f"{section}: bad name {name!r}: use 1-64 letters, digits, "
                               "'_', '.' or '-', starting with a letter or digit")
    where = f"{section}.{name}"
    if not isinstance(fields, Mapping):
        raise TenantsFileError(f"{where} must be a mapping, got {type(fields).__name__}")
    unknown = set(map(str, fields)) - _FIELDS[section]
    if unknown:
        raise TenantsFileError(f"{where}: unknown field(s) {sorted(unknown)}; "
                               f"known: {sorted(_FIELDS[section])}")
    digest = fields.get("token_sha256")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise TenantsFileError(f"{where}.token_sha256 must be 64 hex digits (the SHA-256 "
                               "of the bearer token, e.g. `printf %s TOKEN | sha256sum`)")
    if section == "operators":
        return Principal(name, "operator", digest.lower())
    weight = float(_number(fields.get("weight", 1.0), f"{where}.weight", 1e-6, MAX_WEIGHT))
    max_in_flight = _number(fields.get("max_in_flight", DEFAULT_MAX_IN_FLIGHT),
                            f"{where}.max_in_flight", 1, MAX_IN_FLIGHT, integer=True)
    return Principal(name, "tenant", digest.lower(), weight, int(max_in_flight))


class TenantBook:
    """One reading of the tenants file (immutable: a reload makes a new one)."""

    def __init__(self, principals: list[Principal], path: str | None = None) -> None:
        self.path = path
        self.principals = tuple(principals)
        self.tenants = {p.name: p for p in principals if not p.is_operator}
        self.operators = {p.name: p for p in principals if p.is_operator}

    @classmethod
    def parse(cls, text: str | bytes, path: str | None = None) -> TenantBook:
        """Read a tenants document; anything malformed is a TenantsFileError."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TenantsFileError(f"tenants file is not UTF-8: {e}") from None
        if len(text) > MAX_FILE_BYTES:
            raise TenantsFileError(f"tenants file is larger than {MAX_FILE_BYTES} bytes")
        try:
            doc = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError, ValueError) as e:
            raise TenantsFileError(f"tenants file is not valid YAML: {e}") from None
        if not isinstance(doc, Mapping):
            raise TenantsFileError("tenants file must be a mapping with 'tenants' "
                                   "(and optionally 'operators')")
        unknown = set(map(str, doc)) - set(_FIELDS)
        if unknown:
            raise TenantsFileError(f"unknown top-level key(s) {sorted(unknown)}; "
                                   "known: operators, tenants")
        principals: list[Principal] = []
        for section in ("tenants", "operators"):
            entries = doc.get(section) or {}
            if not isinstance(entries, Mapping):
                raise TenantsFileError(f"{section} must be a mapping of name -> fields")
            if len(principals) + len(entries) > MAX_ENTRIES:
                raise TenantsFileError(f"more than {MAX_ENTRIES} tenants and operators")
            principals.extend(_entry(section, n, f) for n, f in entries.items())
        digests = [p.token_sha256 for p in principals]
        if len(set(digests)) != len(digests):
            raise TenantsFileError("two entries share a token: each tenant and operator "
                                   "needs its own")
        return cls(principals, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TenantBook:
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise TenantsFileError(f"cannot read tenants file {path!r}: {e}") from None
        return cls.parse(data, path)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal whose token is in an ``Authorization: Bearer`` header."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        # Tornado gives header values as latin-1 text: back to the raw bytes.
        digest = token_digest(token.encode("latin-1", "replace"))
        found = None
        for p in self.principals:
            if hmac.compare_digest(digest, p.token_sha256):
                found = p
        return found

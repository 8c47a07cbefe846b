"""mmoref: a self-hostable MMOLove Referral Kit ingest server, in one file.

Run it:        python mmoref_server.py          (serves http://127.0.0.1:5000, ./referrals.db)
Commands:      python mmoref_server.py --help   (or: flask --app mmoref_server --help)
Embed it:      app.register_blueprint(mmoref_server.blueprint, url_prefix="/mmoref")
PostgreSQL:    mmoref_postgres.py beside this file (MMOREF_DB=postgresql://..., and copy-db)
The contract:  docs/contract.md (summarised in README.md).

Sections, each under a `# Title ####` banner: first the contract, in the order one signed event
flows, then what it stands on and what the owner uses.
    Configuration, Errors and hints, Signing, Tokens, Storage interface, State machine,
    Ingest pipeline, Routes;
    Storage, Maintenance, Dashboard views, App factory, Command line, Kit-side sender,
    Templates and style sheet, main.
"""
from __future__ import annotations

import abc
import codecs
import contextlib
import csv
import datetime
import errno
import functools
import hashlib
import hmac
import importlib
import io
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import select
import shlex
import sqlite3
import ssl
import string
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Callable
from typing import NoReturn
from typing import Protocol
from typing import TypedDict
from typing import overload

REQUIRED_PACKAGES = ("Flask", "waitress")   # requirements.txt's, named to an owner with no requirements.txt

try:
    import click
    import jinja2
    from flask import Blueprint
    from flask import Flask
    from flask import abort
    from flask import current_app
    from flask import g
    from flask import redirect
    from flask import request
    from flask import session
    from flask import stream_with_context
    from flask import url_for
    from flask.cli import AppGroup
    from flask.cli import ScriptInfo
    from flask.sessions import SecureCookieSessionInterface
    from itsdangerous import BadData
    from itsdangerous import URLSafeTimedSerializer
    from itsdangerous.encoding import base64_decode
    from itsdangerous.encoding import base64_encode
    from itsdangerous.timed import TimestampSigner
    from werkzeug.exceptions import RequestEntityTooLarge
    from werkzeug.middleware.proxy_fix import ProxyFix
    from werkzeug.security import check_password_hash
    from werkzeug.security import generate_password_hash
except ModuleNotFoundError as missing:  # `python mmoref_server.py` before `pip install -r requirements.txt`
    if __name__ != "__main__":
        raise
    requirements = Path(__file__).resolve().with_name("requirements.txt")
    if not requirements.is_file():  # the file copied alone (the drop-in way)
        sys.exit(f"error: {missing}: mmoref needs {' and '.join(REQUIRED_PACKAGES)};"
                 f" run: pip install {' '.join(REQUIRED_PACKAGES)}")
    shown = "requirements.txt" if Path.cwd() == requirements.parent else str(requirements)
    shown = f'"{shown}"' if " " in shown else shown
    sys.exit(f"error: {missing}: mmoref needs the packages in requirements.txt; run: pip install -r {shown}")

__version__ = "1.1.0"
log = logging.getLogger("mmoref")
COMMAND = "python mmoref_server.py"  # how messages and pages name the CLI; main() names the way it was started


# Configuration ###############################################################
# Every setting can come from an MMOREF_* environment variable; CLI flags win.

def _whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """A parser for a whole number in [low, high]; its ValueError says what is accepted."""
    accepted = f"a whole number from {low} to {high}" if high is not None else f"a whole number, at least {low}"

    def parse(raw: str) -> int:
        with contextlib.suppress(ValueError):
            value = int(raw.strip())
            if value >= low and (high is None or value <= high):
                return value
        raise ValueError(accepted)
    return parse


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _boolean(raw: str) -> bool:
    if raw.strip().lower() not in _BOOLEANS:
        raise ValueError(f"one of {', '.join(_BOOLEANS)}")
    return _BOOLEANS[raw.strip().lower()]


def _one_of(*choices: str) -> Callable[[str], str]:
    """A parser for one of `choices`, in any case; it returns the choice as written here."""
    accepted = f"{', '.join(choices[:-1])} or {choices[-1]}"

    def parse(raw: str) -> str:
        for choice in choices:
            if raw.strip().lower() == choice.lower():
                return choice
        raise ValueError(accepted)
    return parse


def _ip_addresses(raw: str) -> tuple[str, ...]:
    """Comma-separated IP addresses, written the way a server sees them in REMOTE_ADDR."""
    try:
        return tuple(str(ipaddress.ip_address(part.strip())) for part in raw.split(","))
    except ValueError:
        raise ValueError("IP addresses separated by commas, e.g. 127.0.0.1,::1") from None


DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(raw: str) -> int:
    """Seconds in "180d", "12h", "30m" or "3600s"; the ValueError says what is accepted."""
    match = re.fullmatch(r"\s*(\d{1,9})\s*([dhms])\s*", raw.lower())
    if match is None or int(match.group(1)) == 0:
        raise ValueError("a duration like 180d, 12h, 30m or 3600s (days, hours, minutes, seconds)")
    return int(match.group(1)) * DURATION_UNITS[match.group(2)]


SETTINGS: dict[str, tuple[Callable[[str], Any], Any, str]] = {
    # name: (parser, default, what it is)
    "MMOREF_DB": (str, "referrals.db", "SQLite database file, or postgresql://user:pass@host/dbname"),
    "MMOREF_HOST": (str, "127.0.0.1", "address `serve` binds to"),
    "MMOREF_PORT": (_whole_number(1, 65535), 5000, "port `serve` listens on"),
    "MMOREF_REPLAY_WINDOW": (_whole_number(1), 300, "seconds a signature timestamp may be off, past or future"),
    "MMOREF_TOKEN_TTL": (_whole_number(1), 90 * 24 * 3600, "seconds an mmref token (and a clicked referral) lives"),
    "MMOREF_SYNCHRONOUS": (_one_of("FULL", "NORMAL", "EXTRA"), "FULL",
                           "SQLite synchronous mode: FULL (durable) or NORMAL"),
    "MMOREF_TRUSTED_PROXY": (_ip_addresses, (), "the TLS proxy's address(es), as mmoref sees them: only requests"
                             " from these have their X-Forwarded-* headers applied; unset: none"),
    "MMOREF_ADMIN_PASSWORD": (str, None, "dashboard password (else generated on first run)"),
    "MMOREF_THREADS": (_whole_number(1, 1000), 8, "waitress worker threads"),
    "MMOREF_LOG_FORMAT": (_one_of("text", "json"), "text", "`serve`'s log lines: text, or json (one object a line)"),
    "MMOREF_PRUNE_AFTER": (parse_duration, None,
                           "delete log rows older than this (e.g. 180d), daily under `serve`; off when unset"),
    "MMOREF_METRICS_TOKEN": (str, None, "bearer token that lets /metrics answer beyond loopback"),
}
MAX_BODY_BYTES = 64 * 1024          # larger bodies get 413
MAX_FIELD_CHARS = 256               # string fields, after trimming
REJECTED_KEPT_PER_SERVER = 200      # rejected-requests list length (per server, and installation-wide)
REJECTED_SNIPPET_CHARS = 300        # a rejected request keeps the start of its body, this long
DELIVERY_PAYLOAD_CHARS = 2000       # a delivery-log row keeps the start of its body (its payload), this long
CUT_IDENTITY_MIN_CHARS = 3          # `forget`: a snippet cut short that ends with this much of an identity holds it
REJECTIONS_PER_CLIENT_MINUTE = 30   # refusals remembered per client a minute; later ones are answered only
CLICKS_PER_CLIENT_MINUTE = 30       # share-link clicks recorded per client a minute; later ones get no token
DEFAULT_GRACE_SECONDS = 24 * 3600   # how long a rotated-out secret stays valid
ROTATION_SETTLE = 10                # s: a rotation this soon after the last one cuts no grace period short
EVENTS = ("registered", "qualified", "reversed")
IDENTITY_FIELDS = ("username", "account", "character", "email")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # referrer codes, server ids, game slugs
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # as urlsplit().hostname gives them
SIGNATURE_HEADER = "X-MMOLove-Signature"
INGEST_PATH = "/api/referral/events"
SESSION_COOKIE = "mmoref_session"   # the standalone dashboard's; not "session", which a host site may use


def load_settings(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Settings from MMOREF_* environment variables, defaults for the rest; a bad value is a ConfigError."""
    settings = {name: _setting(environ, name, parse, default) for name, (parse, default, _) in SETTINGS.items()}
    trust_proxy = _setting(environ, "MMOREF_TRUST_PROXY", _boolean, None)
    if trust_proxy is not None:
        settings["MMOREF_TRUSTED_PROXY"] = _trusted_as_before(trust_proxy, settings["MMOREF_TRUSTED_PROXY"])
    return settings


def _setting(environ: Mapping[str, str], name: str, parse: Callable[[str], Any], default: Any) -> Any:
    raw = environ.get(name)
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError as accepted:
        raise ConfigError(f"{name}={raw!r} is not valid: expected {accepted}") from None


def _trusted_as_before(trust_proxy: bool, trusted: tuple[str, ...]) -> tuple[str, ...]:
    """What the deprecated MMOREF_TRUST_PROXY trusted: on, MMOREF_TRUSTED_PROXY's addresses (then loopback by
    default); off, none. A warning says what to set instead."""
    meant = (trusted or ("127.0.0.1", "::1")) if trust_proxy else ()
    instead = (f"set MMOREF_TRUSTED_PROXY={','.join(meant)} and remove MMOREF_TRUST_PROXY" if meant
               else "remove MMOREF_TRUST_PROXY and MMOREF_TRUSTED_PROXY (unset, it trusts no proxy)")
    _warn_once(f"MMOREF_TRUST_PROXY is deprecated: for the same effect, {instead}")
    return meant


@functools.cache  # once per process, however often the settings are read
def _warn_once(message: str) -> None:
    log.warning("%s", message)


def now() -> int:
    """The server clock in Unix seconds (tests replace it)."""
    return int(time.time())


def iso_utc(unix_seconds: int | None) -> str | None:
    """2026-11-23T12:00:00Z, or None."""
    if unix_seconds is None:
        return None
    return datetime.datetime.fromtimestamp(unix_seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_registration_url(url: str) -> str:
    """The URL, trimmed, if it is https (or http on a loopback host); else ConfigError."""
    url = url.strip()
    parts = urllib.parse.urlsplit(url)
    local_http = parts.scheme == "http" and parts.hostname in LOCAL_HOSTS
    if not parts.hostname or not (parts.scheme == "https" or local_http):
        raise ConfigError(f"registration URL {url!r} must start with https://"
                          " (http:// is allowed only for localhost, 127.0.0.1 and [::1])")
    return url


def check_name(kind: str, value: str) -> str:
    """A server id, game or referrer code: 1-64 of A-Z a-z 0-9 _ . -"""
    if not NAME_PATTERN.fullmatch(value):
        raise ConfigError(f"{kind} {value!r} must be 1-64 characters of A-Z, a-z, 0-9, _ . -")
    return value


def check_path_segment(kind: str, value: str) -> str:
    """A server id or game (a dashboard URL's path segment): a name, not only dots, which browsers drop."""
    check_name(kind, value)
    if not value.strip("."):
        raise ConfigError(f"{kind} {value!r} must not be only dots: browsers drop such a part of a URL")
    return value


# Errors and hints ############################################################
# ApiError is every refused ingest request: one handler turns it into JSON. HINTS teach
# the fix; the other exceptions say what the sender, the database or the owner must fix.


class ApiError(Exception):
    """One error answer: status, a stable `error`, a hint that teaches the fix, and extras for its body."""

    def __init__(self, status: int, error: str, hint: str, *, diagnosis: str | None = None,
                 server_id: str | None = None, **extra: Any):
        super().__init__(error)
        self.status, self.error, self.hint, self.extra = status, error, hint, extra
        self.diagnosis = diagnosis    # why it probably failed (mac_mismatch, a BOM): the answer's hint ends with it
        self.server_id = server_id    # the known server the refused request names: whose list it goes to

    def body(self) -> dict[str, Any]:
        hint = f"{self.hint} ({self.diagnosis})" if self.diagnosis else self.hint
        return {"ok": False, "error": self.error, "hint": hint, **self.extra}


HINTS = {
    "body too large": f"send at most {MAX_BODY_BYTES // 1024} KiB of JSON",
    "malformed signature header": "expected t=<unix seconds>,v1=sha256=<64 hex digits>[,kid=<key id>]",
    "body is not valid JSON": "send one UTF-8 JSON object, e.g. {\"event\": \"registered\", ...}",
    "body must be a JSON object": "wrap the fields in {...}: event, token, server_id, server_event_id",
    "duplicate key": "each key may appear once in the body",
    "unknown server": "server_id must be the id shown on your dashboard's Referrals tab",
    "referrals not enabled": "enable referrals for this server on its Referrals tab",
    "no signing secret": "generate a secret on the server's Referrals tab",
    "stale_timestamp": ("t must be the current Unix time in seconds (within {window} s of the server clock);"
                        " check the sender's clock and sign each request anew"),
    "unknown_kid": "kid names no live secret of this server: drop kid or use the kid shown on the Referrals tab",
    "mac_mismatch": ("sign \"<t>.<rawBody>\" with the server's secret over the exact bytes you send;"
                     " a trailing newline or re-serialised JSON changes the MAC"),
    "unknown token": ("send the mmref token exactly as the share link minted it for this server"
                      " (from the mmref cookie or query parameter)"),
    "invalid transition": ("a referral in state {state} cannot take a {event} event"
                           " (see the state machine in the README)"),
    "other referee": "this token already anchors another referee_identity; one token refers one player",
    "method not allowed": "POST the event as JSON",
    "internal error": "the server failed; retry later with the same server_event_id (it is idempotent)",
    "database busy": ("another process holds the database's write lock; retry in a few seconds"
                      " with the same server_event_id (it is idempotent)"),
    "database unavailable": ("the database file was deleted or replaced while the server was running;"
                             " the owner must restart it. Retry later with the same server_event_id"),
    "database unreachable": ("the database server is unreachable for now; retry in a few seconds with the same"
                             " server_event_id (it is idempotent)"),
}
RETRY_AFTER_SECONDS = 5   # the Retry-After of a 503


class SignatureError(Exception):
    """A signature header that cannot be accepted: `reason` is missing or malformed (400), stale_timestamp,
    unknown_kid or mac_mismatch (401)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class StoreError(Exception):
    """The database cannot be used as it is; the message says why and `problem` names the cause
    (one of DATABASE_PROBLEMS, "unreachable", "conflict" or "unusable"). Whatever a database driver
    raises leaves the store as one of these."""

    def __init__(self, message: str, problem: str = "unusable"):
        super().__init__(message)
        self.problem = problem


class WriteConflict(StoreError):
    """A write lost a race to another node's (UNIQUE, deadlock, serialization): retried, it sees the winner's rows."""

    def __init__(self, message: str):
        super().__init__(message, "conflict")


class ConfigError(Exception):
    """A setting or argument the owner must fix; the message says how."""


# Signing (docs/contract.md §1.1, §1.2) #######################################
# Pure functions over bytes: no Flask in here, so the kit side and tests share them.

_MAC_PATTERN = re.compile(r"sha256=([0-9a-fA-F]{64})")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class ParsedSignature:
    t: str                  # the timestamp text exactly as sent: it is what was signed
    macs: tuple[str, ...]   # every v1 value, lower-case hex
    kid: str | None

    @property
    def timestamp(self) -> int:
        digits = self.t.lstrip("0")
        return int(digits) if len(digits) <= 18 else 10**18  # centuries away: stale, not a parse problem


def sign(secret: str, t: int | str, raw_body: bytes) -> str:
    """HMAC-SHA256 of "<t>.<raw_body>" under `secret`, as lower-case hex."""
    message = str(t).encode("ascii") + b"." + raw_body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, raw_body: bytes, t: int | None = None, kid: str | None = None) -> str:
    """A valid X-MMOLove-Signature value for `raw_body` (for senders and tests)."""
    t = now() if t is None else t
    header = f"t={t},v1=sha256={sign(secret, t, raw_body)}"
    return f"{header},kid={kid}" if kid else header


def parse_signature_header(header: str | None) -> ParsedSignature:
    """Parse `t=<unix>,v1=sha256=<hex>[,kid=<id>]`; raise SignatureError (400 reasons)."""
    if header is None or not header.strip():
        raise SignatureError("missing", f"send the {SIGNATURE_HEADER} header")
    t_values, macs, kids = [], [], []
    for part in filter(None, (part.strip() for part in header.split(","))):
        if "=" not in part:
            raise SignatureError("malformed", f"every part must be key=value; {part[:40]!r} is not")
        key, value = (piece.strip() for piece in part.split("=", 1))
        if key == "t":
            t_values.append(value)
        elif key == "v1":
            match = _MAC_PATTERN.fullmatch(value)
            if not match:
                raise SignatureError("malformed", "v1 must be sha256= followed by 64 hex digits")
            macs.append(match.group(1).lower())
        elif key == "kid":
            kids.append(value)
    if len(t_values) != 1:
        raise SignatureError("malformed", "the header needs exactly one t=<unix seconds>")
    t = t_values[0]
    if not _DIGITS.fullmatch(t) or not t.strip("0"):
        raise SignatureError("malformed", "t must be a positive integer of Unix seconds")
    if not macs:
        raise SignatureError("malformed", "the header needs v1=sha256=<64 hex digits>")
    if len(kids) > 1 or (kids and not kids[0]):
        raise SignatureError("malformed", "kid may appear once, with a value")
    return ParsedSignature(t=t, macs=tuple(macs), kid=kids[0] if kids else None)


def verify(header: ParsedSignature | str, raw_body: bytes, live_secrets: Sequence[tuple[str, str]],
           at: int, window: int) -> str:
    """The kid of the live secret ([(kid, secret), ...], current first) that signed `raw_body`, else SignatureError.
    Checks, in the order of docs/contract.md §1.4: the replay window (both ways), the kid, the MAC in constant time."""
    parsed = header if isinstance(header, ParsedSignature) else parse_signature_header(header)
    if abs(at - parsed.timestamp) > window:
        raise SignatureError("stale_timestamp", f"t is more than {window} s from the server clock")
    candidates = [(kid, secret) for kid, secret in live_secrets if parsed.kid in (None, kid)]
    if not candidates:
        raise SignatureError("unknown_kid", "kid names no live secret of this server")
    for kid, secret in candidates:
        expected = sign(secret, parsed.t, raw_body)
        if any(hmac.compare_digest(expected, mac) for mac in parsed.macs):
            return kid
    raise SignatureError("mac_mismatch", "no v1 matches the body")


# Tokens (docs/contract.md §3) ################################################
# An mmref token is itsdangerous-signed [server_id, referral_id] plus its issue time,
# under a per-installation key: forgeries are caught without a database read.


class _IssuedAtSigner(TimestampSigner):
    """A TimestampSigner that can stamp a given issue time (the demo mints old tokens)."""

    def __init__(self, *args: Any, issued_at: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.issued_at = issued_at

    def get_timestamp(self) -> int:
        return now() if self.issued_at is None else self.issued_at


@functools.lru_cache(maxsize=64)
def _token_serializer(key: str, issued_at: int | None = None) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(key, salt="mmref-token", signer=_IssuedAtSigner,
                                  signer_kwargs={"issued_at": issued_at})


@functools.lru_cache(maxsize=8)
def _token_reader(key: str) -> tuple[URLSafeTimedSerializer, TimestampSigner]:
    """The serializer and its signer, made once per key (loads() would rebuild the signer)."""
    serializer = _token_serializer(key)
    return serializer, _IssuedAtSigner(key, salt=serializer.salt)


def mint_token(key: str, server_id: str, referral_id: str, issued_at: int) -> str:
    """A URL-safe token (at most about 170 characters) naming the referral."""
    return _token_serializer(key, issued_at).dumps([server_id, referral_id])


@dataclass(frozen=True)
class TokenClaims:
    server_id: str
    referral_id: str
    issued_at: int


def read_token(key: str, token: str) -> TokenClaims | None:
    """The claims of a genuine token, or None for anything forged or garbled."""
    # The HMAC covers "payload.timestamp" as text, but the signature is compared after base64 decoding, which
    # forgives spare low bits and stray characters: accept only its canonical spelling, the string minted.
    try:
        signature = token.rsplit(".", 1)[-1]
        if base64_encode(base64_decode(signature)) != signature.encode("ascii"):
            return None
        serializer, signer = _token_reader(key)
        signed_payload, issued = signer.unsign(token, return_timestamp=True)
        payload = serializer.load_payload(signed_payload)
    except (BadData, ValueError, TypeError):
        return None
    if not (isinstance(payload, list) and len(payload) == 2 and all(isinstance(p, str) for p in payload)):
        return None
    return TokenClaims(payload[0], payload[1], int(issued.timestamp()))


def mask(value: str | None, keep_start: int = 4, keep_end: int = 0) -> str:
    """A PII-light view, never the whole value: the first `keep_start` and last `keep_end` characters around "…"
    ('player-7842' -> 'play…'; with 2, 2 -> 'pl…42'), or the first alone of a value too short to hide anything."""
    if not value:
        return ""
    if len(value) <= keep_start + keep_end + 2:
        return value[:1] + "…"
    return value[:keep_start] + "…" + (value[-keep_end:] if keep_end else "")


# Storage interface ###########################################################
# What the state machine and the pipeline call: a Row read by column name, the Transaction one event's reads and
# writes run in, and the few Store methods the pipeline uses (EventStore). The store itself comes after the routes.

COUNTED = ("clicked", "registered", "qualified", "reversed")


class Row(Protocol):
    """A row read by column name, whichever engine read it (an sqlite3.Row, or a dict from psycopg).
    Only these two are common to both: iterating an sqlite3.Row gives its values, a dict its keys."""

    def __getitem__(self, column: str, /) -> Any: ...

    def keys(self) -> Iterable[str]: ...


class EventStore(Protocol):
    """The Store methods the ingest pipeline calls (Store, after the routes, has them all)."""

    @property
    def token_key(self) -> str: ...

    @property
    def identity_key(self) -> str: ...

    def group_commit(self, work: Callable[[Transaction], Any]) -> Any: ...

    def server(self, server_id: str) -> Row | None: ...

    def all_secrets(self) -> list[str]: ...

    def record_rejected(self, server_id: str | None, status: int, error: str, reason: str | None, hint: str,
                        diagnosis: str | None, snippet: str, *, client: str | None = None,
                        per_client_minute: int | None = None) -> None: ...


def live_secrets(secrets_newest_first: Sequence[Row], server_id: str, at: int) -> list[tuple[str, str]]:
    """[(kid, secret), ...] of the server valid at `at`, current first (at most two)."""
    return [(row["kid"], row["secret"]) for row in secrets_newest_first
            if row["server_id"] == server_id and (row["expires_at"] is None or row["expires_at"] > at)]


@functools.lru_cache(maxsize=4)
def _utc_date(day_number: int) -> str:
    """YYYY-MM-DD of a day counted from 1970-01-01 (UTC)."""
    return (datetime.date(1970, 1, 1) + datetime.timedelta(days=day_number)).isoformat()


class Transaction:
    """The reads and writes of one write transaction (`Store.transaction()` hands one to its work): the
    state machine decides, these only read and write. Rows are mappings by column name."""

    __slots__ = ("db",)
    SECRETS_NEWEST_FIRST = "SELECT server_id, kid, secret, expires_at FROM secrets ORDER BY created_at DESC, rowid DESC"
    ROW_LOCK = ""  # PostgreSQL: " FOR UPDATE" (SQLite's BEGIN IMMEDIATE already serialises every writer)
    SHARE_LOCK = ""  # PostgreSQL: " FOR SHARE"

    def __init__(self, db: Any):
        self.db = db

    def server(self, server_id: str) -> Row | None:
        """No change to the server or its secrets commits before this transaction ends: SQLite's BEGIN
        IMMEDIATE holds every writer off; on PostgreSQL, FOR SHARE holds the row such a change locks first."""
        return self.db.execute(f"SELECT * FROM servers WHERE server_id = ?{self.SHARE_LOCK}", (server_id,)).fetchone()

    def secrets(self) -> list[Row]:
        """Every secret of the installation, newest first (see live_secrets)."""
        return self.db.execute(self.SECRETS_NEWEST_FIRST).fetchall()

    def server_exists(self, server_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM servers WHERE server_id = ?", (server_id,)).fetchone() is not None

    def lock_server(self, server_id: str) -> bool:
        """Whether the server exists, its row locked until the transaction ends."""
        row = self.db.execute(f"SELECT 1 FROM servers WHERE server_id = ?{self.ROW_LOCK}", (server_id,)).fetchone()
        return row is not None

    def referral(self, referral_id: str) -> Row | None:
        return self.db.execute(f"SELECT * FROM referrals WHERE referral_id = ?{self.ROW_LOCK}",
                               (referral_id,)).fetchone()

    def referral_for_event(self, referral_id: str, event: str, server_event_id: str) -> Row | None:
        """The referral, with `seen` true when the idempotency key (token, event, server_event_id) is used."""
        return self.db.execute(
            "SELECT r.*, EXISTS (SELECT 1 FROM delivery_log l WHERE l.token_referral_id = r.referral_id"
            " AND l.event = ? AND l.server_event_id = ?) AS seen FROM referrals r WHERE r.referral_id = ?",
            (event, server_event_id, referral_id)).fetchone()

    def anchored_referral(self, server_id: str, referee_identity: str | None,
                          forgotten_identity: str | None) -> Row | None:
        """The referral anchoring this referee on this server, by identity or forgotten form: one key lookup."""
        return self.db.execute(
            "SELECT r.* FROM anchors a JOIN referrals r ON r.referral_id = a.referral_id"
            " WHERE a.server_id = ? AND a.referee_identity IN (?, ?)",
            (server_id, referee_identity, forgotten_identity)).fetchone()

    def insert_anchor(self, server_id: str, referee_identity: str | None, referral_id: str, at: int) -> None:
        self.db.execute("INSERT INTO anchors (server_id, referee_identity, referral_id, created_at)"
                        " VALUES (?, ?, ?, ?)", (server_id, referee_identity, referral_id, at))

    def follow_anchor(self, referral_id: str, anchor_referral_id: str) -> None:
        """Let a second click's token reach the referral that anchors its referee."""
        self.db.execute("UPDATE referrals SET anchor_referral_id = ? WHERE referral_id = ?",
                        (anchor_referral_id, referral_id))

    def set_state(self, referral_id: str, state: str, at: int, referee_identity: str | None = None) -> None:
        self.db.execute("UPDATE referrals SET state = ?, updated_at = ?,"
                        " referee_identity = coalesce(?, referee_identity) WHERE referral_id = ?",
                        (state, at, referee_identity, referral_id))

    def insert_referral(self, server_id: str, referrer_code: str, issued_at: int,
                        ip_hash: str | None = None, user_agent: str | None = None, test: bool = False) -> str:
        """Write one clicked referral (and, unless it is a test, its click counters); return its new id."""
        referral_id = "ref_" + secrets.token_urlsafe(9)
        self.db.execute("INSERT INTO referrals (referral_id, server_id, referrer_code, state, issued_at,"
                        " updated_at, ip_hash, user_agent, test) VALUES (?, ?, ?, 'clicked', ?, ?, ?, ?, ?)",
                        (referral_id, server_id, referrer_code, issued_at, issued_at, ip_hash,
                         (user_agent or "")[:200] or None, int(test)))
        if not test:
            self.count(server_id, referrer_code, "clicked", issued_at)
        return referral_id

    def log_delivery(self, referral: Row, event: str, outcome: str, at: int, *,
                     token_referral_id: str | None = None, server_event_id: str | None = None,
                     payload: str | None = None, ts: int | float | None = None) -> None:
        """Append a delivery-log row about `referral` (an owner action has no token, key or payload)."""
        self.db.execute(
            "INSERT INTO delivery_log (server_id, referral_id, referrer_code, token_referral_id, event,"
            " server_event_id, outcome, received_at, payload, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (referral["server_id"], referral["referral_id"], referral["referrer_code"], token_referral_id,
             event, server_event_id, outcome, at, payload, ts))
        self.count_event(referral["server_id"], event, outcome)

    # Counters, in the transaction of what they count. Every transaction bumps them in one table
    # order (daily_counts, referrer_counts, event_counts): no deadlock between PostgreSQL nodes.

    def count_event(self, server_id: str, event: str, outcome: str) -> None:
        """Count one answered event for /metrics (outcome: a logged one, or "duplicate")."""
        self.db.execute("INSERT INTO event_counts (server_id, event, outcome, count) VALUES (?, ?, ?, 1) ON CONFLICT"
                        " (server_id, event, outcome) DO UPDATE SET count = event_counts.count + 1",
                        (server_id, event, outcome))

    def count(self, server_id: str, referrer_code: str, column: str, at: int) -> None:
        """Bump the analytics counters for one click or transition (`column`: one of COUNTED)."""
        self.db.execute(f"INSERT INTO daily_counts (server_id, day, {column}) VALUES (?, ?, 1) ON CONFLICT"
                        f" (server_id, day) DO UPDATE SET {column} = daily_counts.{column} + 1",
                        (server_id, _utc_date(at // 86400)))
        self.db.execute(f"INSERT INTO referrer_counts (server_id, referrer_code, {column}) VALUES (?, ?, 1) ON"
                        f" CONFLICT (server_id, referrer_code) DO UPDATE SET {column} = referrer_counts.{column} + 1",
                        (server_id, referrer_code))

    # per-client limits (docs/security.md, "Security notes"): fixed windows, stale ones deleted as they pass

    def hit(self, scope: str, client: str, at: int, window: int) -> int:
        """Count one request of `client` in `scope`'s current `window`-second window; return the window's count."""
        start = at - at % window
        self.db.execute("DELETE FROM client_hits WHERE scope = ? AND window_start < ?", (scope, start))
        self.db.execute("INSERT INTO client_hits (scope, client, window_start, hits) VALUES (?, ?, ?, 1)"
                        " ON CONFLICT (scope, client) DO UPDATE SET hits = client_hits.hits + 1",
                        (scope, client, start))
        return self.hits(scope, client, at, window)

    def hits(self, scope: str, client: str, at: int, window: int) -> int:
        """How many requests `client` made in `scope`'s current window."""
        row = self.db.execute("SELECT hits FROM client_hits WHERE scope = ? AND client = ? AND window_start = ?"
                              + self.ROW_LOCK, (scope, client, at - at % window)).fetchone()
        return row["hits"] if row else 0

    def login_failures(self, client: str) -> tuple[int, int]:
        """(failed logins, time of the last one) of a client; (0, 0) when none is on record."""
        row = self.db.execute(f"SELECT failures, last_at FROM login_failures WHERE client = ?{self.ROW_LOCK}",
                              (client,)).fetchone()
        return (row["failures"], row["last_at"]) if row else (0, 0)

    def add_login_failure(self, client: str, at: int, keep: int) -> None:
        """Count one failed login; beyond `keep` clients, forget those with the fewest failures, oldest first."""
        self.db.execute("INSERT INTO login_failures (client, failures, last_at) VALUES (?, 1, ?)"
                        " ON CONFLICT (client) DO UPDATE SET failures = login_failures.failures + 1,"
                        " last_at = excluded.last_at", (client, at))
        excess = self.db.execute("SELECT count(*) AS n FROM login_failures").fetchone()["n"] - keep
        if excess > 0:
            self.db.execute("DELETE FROM login_failures WHERE client IN (SELECT client FROM login_failures"
                            " ORDER BY failures, last_at LIMIT ?)", (excess,))


# State machine (docs/contract.md §2) #########################################
# The table says what each event does in each state; `apply_event` applies it, with the delivery-log row and the
# idempotency key, in one transaction: it decides, and the Transaction it is given reads and writes.

NO_OP, INVALID = "no_op", "invalid"
TRANSITIONS: dict[str, dict[str, str]] = {
    #  state         event "registered"   event "qualified"   event "reversed"
    "clicked":    {"registered": "registered", "qualified": INVALID, "reversed": INVALID},
    "registered": {"registered": NO_OP, "qualified": "qualified", "reversed": "reversed"},
    "qualified":  {"registered": NO_OP, "qualified": NO_OP, "reversed": "reversed"},
    "reversed":   {"registered": INVALID, "qualified": INVALID, "reversed": NO_OP},
    "expired":    {"registered": INVALID, "qualified": INVALID, "reversed": INVALID},
    "rejected":   {"registered": INVALID, "qualified": INVALID, "reversed": INVALID},
}
# Owner actions (dashboard, CLI): the states they apply to and the state they set.
OWNER_ACTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "reverse": (("registered", "qualified"), "reversed"),
    "reject": (("clicked", "registered", "qualified"), "rejected"),
}


@dataclass(frozen=True)
class Delivery:
    """A verified, well-formed event, ready for the state machine."""
    server_id: str
    event: str
    token_claims: TokenClaims
    server_event_id: str
    referee_identity: str | None
    ts: int | float | None
    payload: str  # the body for the log: token masked, secrets scrubbed, cut to 2,000 characters
    forgotten_identity: str | None = None  # what `forget` leaves of referee_identity (see forgotten_form)


def forgotten_form(identity_key: str, server_id: str, referee_identity: str) -> str:
    """The keyed one-way value `forget` stores instead of an identity: equal for equal
    (server, identity), so first touch still holds, and not reversible without the key."""
    message = f"{server_id}\0{referee_identity}".encode()
    return "forgotten:" + hmac.new(identity_key.encode(), message, hashlib.sha256).hexdigest()[:32]


def apply_event(transaction: Transaction, delivery: Delivery, ttl: int) -> dict[str, Any] | ApiError:
    """Steps 9-10 of docs/contract.md §1.4: the 200 body, or the ApiError to raise once the
    transaction is committed (a detected expiry is stored; nothing else was written)."""
    at, event = now(), delivery.event
    referral = transaction.referral_for_event(delivery.token_claims.referral_id, event, delivery.server_event_id)
    if referral is None or referral["server_id"] != delivery.server_id:
        return ApiError(404, "unknown token", HINTS["unknown token"], server_id=delivery.server_id)
    if referral["seen"]:  # the idempotency key (token, event, server_event_id) was used
        transaction.count_event(delivery.server_id, event, "duplicate")
        return {"ok": True, "duplicate": True}
    if referral["anchor_referral_id"]:  # a second click's token: events apply to the anchored referral
        anchored = transaction.referral(referral["anchor_referral_id"])
        assert anchored is not None, "an anchor names a referral, and referrals are never deleted"
        referral = anchored
    state = referral["state"]
    if state == "clicked" and at - delivery.token_claims.issued_at > ttl:
        transaction.set_state(referral["referral_id"], "expired", at)
        return _invalid_transition(delivery, "expired")
    next_state = TRANSITIONS[state][event]
    other_referee = referral["referee_identity"] not in (delivery.referee_identity, delivery.forgotten_identity)
    if next_state == NO_OP and event == "registered" and other_referee:
        return ApiError(422, "invalid transition", HINTS["other referee"], server_id=delivery.server_id,
                        state=state, event=event)
    if next_state == INVALID:
        return _invalid_transition(delivery, state)
    if state == "clicked":  # `registered`: mint the anchor, unless first touch says otherwise
        anchored = transaction.anchored_referral(delivery.server_id, delivery.referee_identity,
                                                 delivery.forgotten_identity)
        if anchored is None:
            transaction.insert_anchor(delivery.server_id, delivery.referee_identity, referral["referral_id"], at)
        elif anchored["referrer_code"] != referral["referrer_code"]:
            _log(transaction, delivery, referral, "first_touch_conflict", at)
            return {"ok": True, "ignored": "first_touch_conflict"}
        else:  # the same referrer's link clicked twice: this token's later events reach the anchored referral too
            transaction.follow_anchor(referral["referral_id"], anchored["referral_id"])
            referral, next_state = anchored, NO_OP
    if next_state == NO_OP:
        _log(transaction, delivery, referral, "no_op", at)
        return {"ok": True, "referral_id": referral["referral_id"], "state": referral["state"]}
    _advance(transaction, referral, next_state, at, delivery.referee_identity)  # None unless `registered`
    _log(transaction, delivery, referral, "advanced", at)
    return {"ok": True, "referral_id": referral["referral_id"], "state": next_state}


def _advance(transaction: Transaction, referral: Row, next_state: str, at: int,
             referee_identity: str | None = None) -> None:
    """Move the referral to `next_state` (recording its referee on registration) and count it."""
    transaction.set_state(referral["referral_id"], next_state, at, referee_identity)
    if next_state in COUNTED and not referral["test"]:  # the dashboard's test tokens count nowhere
        transaction.count(referral["server_id"], referral["referrer_code"], next_state, at)


def _log(transaction: Transaction, delivery: Delivery, referral: Row, outcome: str, at: int) -> None:
    transaction.log_delivery(referral, delivery.event, outcome, at, token_referral_id=delivery.token_claims.referral_id,
                             server_event_id=delivery.server_event_id, payload=delivery.payload, ts=delivery.ts)


def _invalid_transition(delivery: Delivery, state: str) -> ApiError:
    hint = HINTS["invalid transition"].format(state=state, event=delivery.event)
    return ApiError(422, "invalid transition", hint, server_id=delivery.server_id, state=state, event=delivery.event)


def owner_action(store: Store, referral_id: str, action: str) -> str:
    """Reverse or reject a referral as the owner; log it; return the new state."""
    allowed_from, next_state = OWNER_ACTIONS[action]
    at = now()
    with store.transaction() as transaction:
        referral = transaction.referral(referral_id)
        if referral is None:
            raise ConfigError(f"unknown referral {referral_id!r}")
        if referral["state"] not in allowed_from:
            raise ConfigError(f"cannot {action} referral {referral_id} in state {referral['state']!r}"
                              f" (only from {', '.join(allowed_from)})")
        _advance(transaction, referral, next_state, at)
        transaction.log_delivery(referral, next_state, "owner_action", at)
    return next_state


# Ingest pipeline (docs/contract.md §1.4) #####################################
# One function, its steps in the order of docs/contract.md §1.4, each failing early with ApiError.


def process_event(store: EventStore, raw_body: bytes, header: str | None, *, window: int, ttl: int) -> dict[str, Any]:
    """Steps 2-10 of docs/contract.md §1.4 (step 1, the size cap, is the route's), for the route and the dashboard's
    "Send test event": the 200 body, or ApiError, whose `server_id` names the known server the request is about.
    Steps 5-10 run in the write transaction that stores the event, so a revoked secret or a disabled server is
    refused from the moment its change commits, and a 200 is sent only after the COMMIT that holds the event."""
    # 2. signature header present and well-formed
    try:
        parsed = parse_signature_header(header)
    except SignatureError as exc:
        error = "missing signature header" if exc.reason == "missing" else "malformed signature header"
        raise ApiError(400, error, f"{exc}; {HINTS['malformed signature header']}",
                       server_id=_known_server_id(store, raw_body)) from None
    # 3. body is a JSON object; 4. fields have the documented shape
    body = parse_body(raw_body)
    try:
        fields = read_fields(body, _SURROGATE_ESCAPE.search(raw_body) is not None)
    except ApiError as exc:
        exc.server_id = _known_server_id(store, body)
        raise
    server_id = fields.server_id
    # a MAC mismatch's (live, revoked secrets), diagnosed after the transaction instead of holding it
    mismatched: list[tuple[list[tuple[str, str]], list[str]]] = []

    def verified_and_applied(transaction: Transaction) -> dict[str, Any] | ApiError:
        # 5. the server exists, takes referrals and has a secret
        server = transaction.server(server_id)
        if server is None:
            raise ApiError(404, "unknown server", HINTS["unknown server"])
        if not server["referrals_enabled"]:
            raise ApiError(404, "referrals not enabled", HINTS["referrals not enabled"], server_id=server_id)
        at, every_secret = now(), transaction.secrets()
        live = live_secrets(every_secret, server_id, at)
        if not live:
            raise ApiError(404, "no signing secret", HINTS["no signing secret"], server_id=server_id)
        # 6. timestamp window, kid, MAC; a MAC mismatch says why, when a usual mistake explains it
        try:
            verify(parsed, raw_body, live, at, window)
        except SignatureError as exc:
            if exc.reason == "mac_mismatch":
                revoked = [row["secret"] for row in every_secret if row["server_id"] == server_id
                           and row["expires_at"] is not None and row["expires_at"] <= at][:5]  # the newest five
                mismatched[:] = [(live, revoked)]
            raise ApiError(401, "bad_signature", HINTS[exc.reason].format(window=window), server_id=server_id,
                           reason=exc.reason) from None
        # 7. a verified dry run stops here
        if fields.test:
            return {"ok": True, "test": True}
        # 8. the token is genuine and minted for this server (no database read needed)
        claims = read_token(store.token_key, fields.token)
        if claims is None or claims.server_id != server_id:
            raise ApiError(404, "unknown token", HINTS["unknown token"], server_id=server_id)
        forgotten = (forgotten_form(store.identity_key, server_id, fields.referee_identity)
                     if fields.referee_identity is not None else None)
        snippet = _scrubbed_snippet(raw_body, [row["secret"] for row in every_secret], limit=DELIVERY_PAYLOAD_CHARS)
        # 9-10. duplicate check and state machine
        return apply_event(transaction, Delivery(server_id, fields.event, claims, fields.server_event_id,
                                                 fields.referee_identity, fields.ts, snippet, forgotten), ttl)

    try:
        outcome = store.group_commit(verified_and_applied)
    except ApiError as exc:
        if mismatched:  # why, when a usual mistake explains it
            exc.diagnosis = diagnose_mac_mismatch(parsed, raw_body, *mismatched[0], fields.ts)
        raise
    if isinstance(outcome, ApiError):
        raise outcome
    return outcome


def _known_server_id(store: EventStore, body: dict[str, Any] | bytes) -> str | None:
    """The body's server_id, trimmed, if it names a known server: whose list a refusal goes to (None: everyone's)."""
    if isinstance(body, bytes):
        try:
            body = parse_body(body)
        except ApiError:
            return None
    server_id = body.get("server_id")
    if not isinstance(server_id, str) or not _is_valid_unicode(server_id) or store.server(server_id.strip()) is None:
        return None
    return server_id.strip()


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ApiError(400, "duplicate key", HINTS["duplicate key"], field=key)
        obj[key] = value
    return obj


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


MAX_JSON_DEPTH = 32  # levels of arrays and objects, the body's own object being level 1
# A JSON string; an unterminated one runs to the end, so stripping strings stays linear in time.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
_OPENING_BRACKETS = frozenset(b"[{")


def _nests_too_deep(raw_body: bytes) -> bool:
    """Do arrays and objects nest deeper than MAX_JSON_DEPTH (brackets in strings do not count)? Our own
    limit, so every Python answers alike (3.13's parser takes depths that 3.9-3.12 refuse)."""
    if raw_body.count(b"[") + raw_body.count(b"{") <= MAX_JSON_DEPTH:  # the hot path: too few to be too deep
        return False
    depth = 0
    for bracket in _JSON_STRING.sub(b"", raw_body).translate(None, _NOT_BRACKETS):
        depth += 1 if bracket in _OPENING_BRACKETS else -1
        if depth > MAX_JSON_DEPTH:
            return True
    return False


def parse_body(raw_body: bytes) -> dict[str, Any]:
    """Strict JSON: UTF-8, nested at most MAX_JSON_DEPTH levels, no NaN/Infinity, no duplicate keys, an object."""
    if _nests_too_deep(raw_body):
        raise ApiError(400, "body is not valid JSON", f"{HINTS['body is not valid JSON']};"
                       f" arrays and objects may nest at most {MAX_JSON_DEPTH} levels deep")
    try:
        body = json.loads(raw_body.decode("utf-8"), object_pairs_hook=_object_without_duplicates,
                          parse_constant=_reject_constant)
    except ValueError:  # bad UTF-8, bad JSON, too many digits
        bom = raw_body.startswith(codecs.BOM_UTF8)
        raise ApiError(400, "body is not valid JSON", HINTS["body is not valid JSON"], diagnosis=(
            "the body starts with a UTF-8 byte-order mark, EF BB BF, which Windows PowerShell 5.1 writes:"
            " send and sign the JSON without it") if bom else None) from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object", HINTS["body must be a JSON object"])
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _is_valid_unicode(value: Any) -> bool:
    """Whether every string in `value` (a str, or what json.loads gives) has no lone surrogate such as "\\ud800"."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _string_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ApiError(400, "missing field", f"{name} is required: a non-empty string", field=name)
    if not isinstance(value, str) or not _is_valid_unicode(value):
        raise ApiError(400, "invalid field", f"{name} must be a string of valid Unicode", field=name)
    value = value.strip()
    if len(value) > MAX_FIELD_CHARS:
        raise ApiError(400, "invalid field", f"{name} must be at most {MAX_FIELD_CHARS} characters", field=name)
    return value


@dataclass(frozen=True)
class EventFields:
    event: str
    token: str
    server_id: str
    server_event_id: str
    referee_identity: str | None
    ts: int | float | None
    test: bool


def read_fields(body: dict[str, Any], may_hold_surrogates: bool = True) -> EventFields:
    """Check the docs/contract.md §1.3 field table, in table order; the first problem is the answer.
    `may_hold_surrogates=False` (the raw text has no \\uD800-\\uDFFF escape) skips the walk over every string."""
    event = _string_field(body, "event")
    if event not in EVENTS:
        raise ApiError(400, "invalid field", "event must be registered, qualified or reversed", field="event")
    token = _string_field(body, "token")
    server_id = _string_field(body, "server_id")
    server_event_id = _string_field(body, "server_event_id")
    referee_identity = _string_field(body, "referee_identity") if event == "registered" else None
    ts = body.get("ts")
    ts_is_number = isinstance(ts, (int, float)) and not isinstance(ts, bool)
    # range first: math.isfinite turns an int into a float, which overflows from 10**309 on
    if ts is not None and not (ts_is_number and -(2**63) <= ts < 2**63 and math.isfinite(ts)):
        raise ApiError(400, "invalid field", "ts must be a finite number of Unix seconds (64-bit)", field="ts")
    test = body.get("test")
    if test is not None and not isinstance(test, bool):
        raise ApiError(400, "invalid field", "test must be true or false (a JSON boolean)", field="test")
    for key, value in body.items() if may_hold_surrogates else ():
        if key != "referee_identity" and not _is_valid_unicode([key, value]):
            raise ApiError(400, "invalid field", "strings must be valid Unicode (no lone surrogates)", field=key)
    return EventFields(event, token, server_id, server_event_id, referee_identity, ts, bool(test))


_TOKEN_VALUE = re.compile(r'("token"\s*:\s*")([^"]*)(")')
_JSON_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")
_SECRET_CHARACTERS = frozenset(string.ascii_letters + string.digits + "_-")  # mmsk_ + token_urlsafe


def _scrubbed_snippet(raw_body: bytes, secrets_to_hide: Sequence[str], limit: int) -> str:
    """The body for storage: token masked, any secret replaced (before cutting), `limit` long. Secrets are
    looked for in the decoded text: `mmsk\\u005f...` is the same secret to a JSON reader."""
    text = raw_body.decode("utf-8", "replace")
    body = _parsed_or_none(raw_body) if "\\u" in text else None  # a key spelt "\u0074oken" escapes _TOKEN_VALUE
    if isinstance(body, dict) and "token" in body:
        text = json.dumps({**body, "token": mask(str(body["token"]))})
    else:
        text = _TOKEN_VALUE.sub(lambda m: m.group(1) + mask(m.group(2)) + m.group(3), text)
    text = _JSON_ESCAPE.sub(_decoded_if_secret_character, text)
    for secret in secrets_to_hide:
        text = text.replace(secret, "[secret]")
    return text[:limit]


def _decoded_if_secret_character(escape: re.Match[str]) -> str:
    """The character a \\uXXXX escape stands for when a secret could contain it; else the escape as is."""
    character = chr(int(escape.group(1), 16))
    return character if character in _SECRET_CHARACTERS else escape.group(0)


def diagnose_mac_mismatch(parsed: ParsedSignature, raw_body: bytes, live: Sequence[tuple[str, str]],
                          revoked: Sequence[str], body_ts: Any) -> str | None:
    """Why a MAC probably failed, when one of the usual mistakes explains it (docs/contract.md §1.5)."""
    live_values = [secret for _, secret in live]

    def sent(digest: str) -> bool:
        return any(hmac.compare_digest(digest, mac) for mac in parsed.macs)

    def signed(messages: Iterable[bytes], keys: Sequence[str] = live_values) -> bool:
        """Whether a v1 of the header is the HMAC of one of `messages` under one of `keys`."""
        return any(sent(hmac.new(key.encode("utf-8"), message, hashlib.sha256).hexdigest())
                   for message in messages for key in keys)

    t_dot = parsed.t.encode("ascii") + b"."
    trimmed = raw_body.rstrip(b"\r\n")
    if trimmed != raw_body and signed([t_dot + trimmed]):
        return "the MAC matches this body without its trailing newline: sign the exact bytes you send"
    if signed(t_dot + raw_body + end for end in (b"\n", b"\r\n")):
        return ("the MAC matches this body plus a trailing newline: your HTTP client changed the body"
                " (curl -d strips newlines); send it with --data-binary")
    if signed([t_dot + codecs.BOM_UTF8 + raw_body]):
        return ("the MAC matches this body with a UTF-8 byte-order mark, EF BB BF, in front (Windows PowerShell 5.1"
                " writes one at the start of a file): sign the bytes you send, without it")
    if signed(t_dot + other for other in _line_breaks_put_back(raw_body)):
        return ("the MAC matches this body with its line breaks put back: curl -d @file strips newlines;"
                " send the file with --data-binary @file")
    if signed(t_dot + other for other in _reserialised(raw_body)):
        return ("the MAC matches the same JSON written differently (spacing or key order): sign the exact"
                " bytes you send, not a re-serialised copy, and send them unchanged")
    ts = body_ts if isinstance(body_ts, (int, float)) and not isinstance(body_ts, bool) else None
    ts_differs = ts is not None and ts != parsed.timestamp
    if ts_differs and isinstance(ts, int) and signed([f"{ts}.".encode("ascii") + raw_body]):
        return "the MAC matches a different t (the body's ts): sign with the t you put in the header"
    if signed([t_dot + raw_body], revoked):
        return "this MAC was made with a previous, revoked secret: use the current secret"
    if signed([raw_body]):
        return 'the MAC matches the body alone: sign "<t>.<body>", the header\'s t, a dot, then the body'
    for separator in _WRONG_SEPARATORS:
        if signed([parsed.t.encode("ascii") + separator + raw_body]):
            shown = json.dumps(separator.decode("ascii"))[1:-1]
            return f'the MAC matches "<t>{shown}<body>": join t and the body with a dot, "<t>.<body>"'
    hashed = _plain_hash_inputs([t_dot + raw_body, raw_body], live_values)
    if any(sent(hashlib.sha256(text).hexdigest()) for text in hashed):
        return ("v1 is a plain SHA-256 of the signed text, not an HMAC: compute HMAC-SHA256 with the secret as"
                " the key: hash_hmac in PHP, not hash")
    if ts_differs:  # not proof, but the usual slip when nothing else explains it
        return (f"the header's t ({parsed.t}) differs from the body's ts ({ts}): "
                "the MAC must be made with the header's t")
    return None


_WRONG_SEPARATORS = (b":", b"", b" ", b",", b"\n")   # put between t and the body instead of "."


def _plain_hash_inputs(texts: Sequence[bytes], secrets_: Sequence[str]) -> Iterator[bytes]:
    """What a sender that hashed instead of using an HMAC may have hashed: each text, alone or with a secret."""
    for text in texts:
        yield text
        for secret in secrets_:
            yield secret.encode("utf-8") + text
            yield text + secret.encode("utf-8")


def _parsed_or_none(raw_body: bytes) -> Any:
    try:
        return json.loads(raw_body)
    except (ValueError, RecursionError):
        return None


def _reserialised(raw_body: bytes) -> list[bytes]:
    """The usual other spellings of the same JSON (a sender that signed one and sent another)."""
    body = _parsed_or_none(raw_body)
    if body is None:
        return []
    spellings = {json.dumps(body, sort_keys=sort_keys, separators=separators, ensure_ascii=ascii_only).encode()
                 for sort_keys in (False, True) for separators in ((", ", ": "), (",", ":"))
                 for ascii_only in (True, False)}
    return [spelling + end for spelling in spellings for end in (b"", b"\n") if spelling + end != raw_body]


# a pretty-printed file whose line breaks curl -d @file stripped: "{" and then one level's indentation
_INDENT_LEFT = re.compile(rb"[{\[](\t| {2,})[^ \t]")


def _line_breaks_put_back(raw_body: bytes) -> list[bytes]:
    """The pretty-printed files (LF or CRLF lines, with or without a last newline) that become `raw_body`
    once `curl -d @file` strips their line breaks. Indentation and the space after each colon are read from
    the body (json.dumps, jq and JSON.stringify write `": "`, Windows PowerShell 5.1 `":  "`)."""
    indented = _INDENT_LEFT.match(raw_body)
    body = _parsed_or_none(raw_body) if indented else None
    if indented is None or body is None:
        return []
    indent, colon = indented.group(1).decode("ascii"), ":  " if b'":  ' in raw_body else ": "
    text = raw_body.decode("utf-8", "replace")
    pretty = {json.dumps(body, indent=indent, separators=(",", colon), ensure_ascii=ascii_only)
              for ascii_only in (True, False)}
    return [(spelling.replace("\n", line_end) + last).encode("utf-8")
            for spelling in pretty if spelling.replace("\n", "") == text
            for line_end in ("\n", "\r\n") for last in ("", line_end)]


def handle_ingest(store: EventStore, raw_body: bytes, header: str | None, *, window: int, ttl: int,
                  client: str | None = None) -> tuple[int, dict]:
    """Run the pipeline; remember refusals; log one line; return (status, body). `client` (a keyed hash of
    the sender's address) limits the refusals remembered a minute; None (the test button, the demo): all."""
    try:
        body, status = process_event(store, raw_body, header, window=window, ttl=ttl), 200
    except ApiError as exc:
        body, status = exc.body(), exc.status
        if status in (400, 401, 404, 422):
            _remember_rejection(store, exc, raw_body, client)
    except StoreError as exc:  # nothing was written
        status, body = _database_failure(exc)
    except Exception:  # 11. anything unexpected: the transaction rolled back
        log.exception("ingest failed")
        status, body = 500, ApiError(500, "internal error", HINTS["internal error"]).body()
    _log_ingest(status, body.get("error"), reason=body.get("reason"), outcome=_outcome_word(body),
               server=_logged_value(_LOGGED_SERVER, raw_body),
               token=mask(_logged_value(_LOGGED_TOKEN, raw_body)) or None)
    return status, body


def _log_ingest(status: int, error: str | None, **more: str | None) -> None:
    """The one log line of an ingest request: `key=value` words, or JSON keys (MMOREF_LOG_FORMAT=json)."""
    fields = {"status": status, "error": error, **more}
    words = " ".join(f"{name}={'-' if value is None else value}" for name, value in fields.items())
    log.info("ingest %s", words, extra={"fields": fields})


def _database_failure(exc: StoreError) -> tuple[int, dict]:
    """503 when the database is locked by another process or no longer the file opened; else 500."""
    problem = exc.problem
    if problem == "locked":
        return 503, ApiError(503, "database busy", HINTS["database busy"]).body()
    if problem in ("deleted", "replaced"):
        return 503, ApiError(503, "database unavailable", HINTS["database unavailable"]).body()
    if problem == "unreachable":  # PostgreSQL down or restarting: the node recovers by itself
        log.warning("ingest: %s", exc)
        return 503, ApiError(503, "database unavailable", HINTS["database unreachable"]).body()
    log.error("ingest failed: %s", exc, exc_info=exc.__cause__ or exc)  # with what the engine raised
    return 500, ApiError(500, "internal error", HINTS["internal error"]).body()


def _outcome_word(body: dict[str, Any]) -> str | None:
    if not body.get("ok"):
        return None
    for word in ("duplicate", "test", "ignored"):
        if word in body:
            return word if word != "ignored" else body["ignored"]
    return body.get("state")


# For the log line, found without parsing; only characters a real value has, so a hostile
# body cannot write anything else (a newline, say) into the log.
_LOGGED_SERVER = re.compile(rb'"server_id"\s*:\s*"\s*([A-Za-z0-9_.-]{1,64})\s*"')
_LOGGED_TOKEN = re.compile(rb'"token"\s*:\s*"\s*([A-Za-z0-9_.-]{1,256})\s*"')


def _logged_value(pattern: re.Pattern[bytes], raw_body: bytes) -> str | None:
    match = pattern.search(raw_body[:4096])
    return match.group(1).decode("ascii") if match else None


def _remember_rejection(store: EventStore, exc: ApiError, raw_body: bytes, client: str | None) -> None:
    """Keep the refusal for the dashboard: reason, hint, a masked snippet, never a secret (a body may hold one
    by mistake, and one that does not parse names no server: every secret of the installation is scrubbed)."""
    try:
        snippet = _scrubbed_snippet(raw_body, store.all_secrets(), limit=REJECTED_SNIPPET_CHARS)
        store.record_rejected(exc.server_id, exc.status, exc.error, exc.extra.get("reason"), exc.hint,
                              exc.diagnosis, snippet, client=client, per_client_minute=REJECTIONS_PER_CLIENT_MINUTE)
    except StoreError as exc:  # the answer stands; /healthz says what the database lacks
        log.warning("could not record a rejected request: %s", exc)


# Routes: ingest, share link, health ##########################################

blueprint = Blueprint("mmoref", __name__)


def _set_up_host_app(state: Any) -> None:
    """Give a host app that registers the blueprint the MMOREF_* settings it lacks, and refuse one without a
    SECRET_KEY here, in one line: the dashboard's login session is signed with it (the standalone app's
    session interface finds its own key)."""
    app = state.app
    for name, value in load_settings().items():
        app.config.setdefault(name, value)
    if not app.secret_key and not isinstance(app.session_interface, _SessionInterface):
        raise ConfigError("mmoref_server.blueprint needs the host app's SECRET_KEY (the dashboard's login session"
                          " is signed with it): set app.config['SECRET_KEY'] before register_blueprint()")


blueprint.record_once(_set_up_host_app)
_store_lock = threading.Lock()


def get_store() -> Store:
    """The app's Store, opened (and migrated) on first use."""
    extensions = current_app.extensions
    if "mmoref" not in extensions:
        with _store_lock:
            if "mmoref" not in extensions:
                extensions["mmoref"] = open_store(current_app.config["MMOREF_DB"],
                                                  synchronous=current_app.config["MMOREF_SYNCHRONOUS"],
                                                  busy_timeout=REQUEST_BUSY_TIMEOUT)
    return extensions["mmoref"]


def json_response(body: dict[str, Any], status: int = 200) -> Any:
    """JSON in the field order docs/contract.md shows ("ok" first), whatever the host app's JSON settings."""
    return current_app.response_class(json.dumps(body), status=status, mimetype="application/json")


@blueprint.app_errorhandler(405)
def _method_not_allowed(exc: Exception) -> Any:
    """Methods no route lists (e.g. PROPFIND): JSON on the ingest path too; the host's paths keep theirs."""
    if request.path.endswith(INGEST_PATH):
        return _api_error(ApiError(405, "method not allowed", HINTS["method not allowed"]))
    return exc


@blueprint.app_errorhandler(404)
def _not_found(exc: Exception) -> Any:
    """Near misses of the ingest path (`/api/referral/event`...) get JSON a kit can read; others, the app's 404."""
    api_root = url_for("mmoref.ingest")[len(request.script_root):-len(INGEST_PATH)] + "/api/"
    if request.path.startswith(api_root):
        return json_response({"ok": False, "error": "not found", "hint": f"POST events to {INGEST_PATH}"}, 404)
    return exc


@blueprint.errorhandler(ApiError)
def _api_error(exc: ApiError) -> Any:
    """Errors raised outside the pipeline (405, 413); the pipeline's own go through handle_ingest."""
    _log_ingest(exc.status, exc.error)
    response = json_response(exc.body(), exc.status)
    if exc.status == 405:
        response.headers["Allow"] = "POST"
    return response


@blueprint.route(INGEST_PATH, methods=["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "POST"],
                 provide_automatic_options=False)
def ingest() -> Any:
    if request.method != "POST":
        raise ApiError(405, "method not allowed", HINTS["method not allowed"])
    # 1. the size cap, from Content-Length before reading, else while reading (Werkzeug stops a streamed body
    # at the limit without raising: read one byte past the cap)
    raw_body: bytes | None = None
    request.max_content_length = MAX_BODY_BYTES + 1
    if request.content_length is None or request.content_length <= MAX_BODY_BYTES:
        with contextlib.suppress(RequestEntityTooLarge):
            raw_body = request.get_data(cache=False)
    if raw_body is None or len(raw_body) > MAX_BODY_BYTES:
        raise ApiError(413, "body too large", HINTS["body too large"])
    config, store, started = current_app.config, get_store(), time.perf_counter()
    status, body = handle_ingest(store, raw_body, request.headers.get(SIGNATURE_HEADER),
                                 window=config["MMOREF_REPLAY_WINDOW"], ttl=config["MMOREF_TOKEN_TTL"],
                                 client=client_key(store, request.remote_addr))
    store.observe_latency(time.perf_counter() - started)
    response = json_response(body, status)
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


NOT_FOUND_PAGE = ("<!doctype html><meta charset=utf-8><title>Link not found</title>"
                  "<p>This referral link is not valid.</p>")


@blueprint.get("/r/<server_id>")
def share_link(server_id: str) -> Any:
    """Record a click, mint a token, set the mmref cookie, send the player to register. A HEAD request (link
    previews, crawlers) and a client past CLICKS_PER_CLIENT_MINUTE go there with no token, nothing recorded."""
    code = request.args.get("ref", "")
    store = get_store()
    server = store.server(server_id) if NAME_PATTERN.fullmatch(code) else None
    if server is None or not server["referrals_enabled"] or not server["registration_url"]:
        return NOT_FOUND_PAGE, 404, {"Content-Type": "text/html; charset=utf-8"}
    minted = None
    if request.method == "GET":
        minted = store.mint_referral(server_id, code, ip_hash=_ip_hash(store, request.remote_addr),
                                     user_agent=request.user_agent.string,
                                     click_limit=(client_key(store, request.remote_addr), CLICKS_PER_CLIENT_MINUTE))
    if minted is None:
        return redirect(server["registration_url"], 302)
    token, _ = minted
    response = redirect(_with_query(server["registration_url"], mmref=token), 302)
    response.set_cookie("mmref", token, max_age=current_app.config["MMOREF_TOKEN_TTL"], samesite="Lax",
                        httponly=True, secure=request.is_secure)
    return response


def _ip_hash(store: Store, ip: str | None) -> str | None:
    """A keyed hash of the address: pseudonymous, not anonymous (the key is in the same database)."""
    return _keyed_address(store.installation_key("ip_salt"), ip) if ip else None


def client_key(store: Store, ip: str | None) -> str:
    """Whom a per-client limit counts: the address's keyed hash, an IPv6 client by its /64 network."""
    return _client_key(store.installation_key("ip_salt"), ip or "")


@functools.lru_cache(maxsize=1024)
def _keyed_address(salt: str, ip: str) -> str:
    return hmac.new(salt.encode(), ip.encode(), hashlib.sha256).hexdigest()[:16]


@functools.lru_cache(maxsize=1024)  # every ingest request asks (a kit sends from a handful of addresses)
def _client_key(salt: str, ip: str) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return "-"
    if isinstance(address, ipaddress.IPv6Address):  # an IPv4-mapped one as its IPv4 address
        return _keyed_address(salt, str(address.ipv4_mapped or ipaddress.ip_network(f"{address}/64", strict=False)))
    return _keyed_address(salt, str(address))


def _with_query(url: str, **params: str) -> str:
    """`url` with `params` set in its query string, other parameters kept."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode([*query, *params.items()])))


@blueprint.get("/healthz")
def healthz() -> Any:
    """200 when the database can take writes; else 503 with the cause. Never waits for the write lock."""
    try:
        problem = get_store().health()
    except StoreError as exc:  # the database could not even be opened
        problem = exc
    if problem is None:
        return json_response({"ok": True})
    return json_response({"ok": False, "error": "database unavailable", "reason": problem.problem,
                          "hint": str(problem)}, 503)


def _is_loopback(host: str) -> bool:
    """A loopback address or "localhost": /metrics answers it, and `serve` warns for anything else."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@blueprint.get("/metrics")
def metrics() -> Any:
    """Prometheus text format from the database's counters (the same in every worker), for loopback clients
    not behind a proxy, or anyone with `Authorization: Bearer <MMOREF_METRICS_TOKEN>` when that is set."""
    token = current_app.config.get("MMOREF_METRICS_TOKEN")
    if token:
        sent = request.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            return json_response({"ok": False, "error": "forbidden",
                                  "hint": "send Authorization: Bearer <MMOREF_METRICS_TOKEN>"}, 403)
    elif not _is_loopback(request.remote_addr or "") or "X-Forwarded-For" in request.headers:
        return json_response({"ok": False, "error": "not found",
                              "hint": "/metrics answers loopback only; set MMOREF_METRICS_TOKEN to scrape it"
                                      " from elsewhere"}, 404)
    store = get_store()
    text = render_metrics(store.metrics(), store.database_bytes())
    return current_app.response_class(text, mimetype="text/plain; version=0.0.4")


def _metric(lines: list[str], name: str, kind: str, about: str, samples: Sequence[tuple[dict, Any]]) -> None:
    lines += [f"# HELP {name} {about}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        shown = ",".join(f'{key}="{_label(label)}"' for key, label in labels.items())
        lines.append(f"{name}{{{shown}}} {value}" if shown else f"{name} {value}")


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(snapshot: dict[str, Any], database_bytes: int) -> str:
    """The Prometheus text exposition of Store.metrics()."""
    lines: list[str] = []
    _metric(lines, "mmoref_events_total", "counter", "Signed events answered 200, by event and outcome.",
            [({"server_id": s, "event": e, "outcome": o}, n) for s, e, o, n in snapshot["events"]])
    _metric(lines, "mmoref_rejections_total", "counter", "Refused ingest requests, by status, error and reason.",
            [({"status": s, "error": e, "reason": r}, n) for s, e, r, n in snapshot["rejections"]])
    _metric(lines, "mmoref_share_link_clicks_total", "counter", "Share links followed (referrals minted).",
            [({"server_id": s}, n) for s, n in snapshot["clicks"]])
    _metric(lines, "mmoref_ingest_latency_seconds", "histogram", "Time to answer an ingest request.", [])
    cumulative = 0
    for le in [*map(str, LATENCY_BUCKETS), "+Inf"]:
        cumulative += snapshot["latency"].get(le, 0)
        lines.append(f'mmoref_ingest_latency_seconds_bucket{{le="{le}"}} {cumulative}')
    lines += [f"mmoref_ingest_latency_seconds_sum {snapshot['latency_seconds']}",
              f"mmoref_ingest_latency_seconds_count {cumulative}"]
    _metric(lines, "mmoref_database_bytes", "gauge", "Database file plus write-ahead log.", [({}, database_bytes)])
    _metric(lines, "mmoref_last_event_timestamp_seconds", "gauge", "When the newest delivery-log row was written.",
            [({}, snapshot["last_event_at"] or 0)])
    return "\n".join(lines) + "\n"


# Storage #####################################################################
# One Store interface; SQLite is its engine here (standard library only), and PostgreSQL's, for many
# mmoref nodes sharing one database, is in the companion file mmoref_postgres.py. Statements are written
# once, with ? placeholders, where the dialects agree; rows are read by column name (Row).

# The tables of a new database in their final form, written once for both engines in SQLite's words
# (mmoref_postgres.py translates the few that PostgreSQL spells otherwise). A new schema version
# changes them here and appends its statements to MIGRATIONS for the databases made before it;
# tests/test_storage.py checks that both give the same tables.
SCHEMA: list[str] = [
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE servers (
        server_id TEXT PRIMARY KEY, game TEXT NOT NULL, name TEXT NOT NULL DEFAULT '',
        registration_url TEXT, identity_field TEXT NOT NULL DEFAULT 'username',
        referrals_enabled INTEGER NOT NULL DEFAULT 1, created_at INTEGER NOT NULL)""",
    # expires_at NULL: the current secret; otherwise valid until then (<= now: revoked).
    # rotation_nonce: the rotate form's one-time value (a re-sent form finds its rotation instead of
    # rotating again); revealed_at: when the dashboard showed the secret (its one time), NULL until then
    """CREATE TABLE secrets (
        kid TEXT PRIMARY KEY, server_id TEXT NOT NULL, secret TEXT NOT NULL,
        created_at INTEGER NOT NULL, expires_at INTEGER, rotation_nonce TEXT, revealed_at INTEGER)""",
    "CREATE INDEX secrets_by_server ON secrets (server_id, created_at)",
    "CREATE UNIQUE INDEX secrets_by_rotation_nonce ON secrets (server_id, rotation_nonce)",
    # anchor_referral_id: a second click by the same referrer, whose token follows the referee's
    # anchored referral; test: minted by the dashboard's "Mint a test token", left out of every counter
    """CREATE TABLE referrals (
        referral_id TEXT PRIMARY KEY, server_id TEXT NOT NULL, referrer_code TEXT NOT NULL,
        state TEXT NOT NULL, referee_identity TEXT, issued_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL, ip_hash TEXT, user_agent TEXT, anchor_referral_id TEXT,
        test INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX referrals_by_server ON referrals (server_id, issued_at)",
    """CREATE TABLE anchors (
        server_id TEXT NOT NULL, referee_identity TEXT NOT NULL, referral_id TEXT NOT NULL,
        created_at INTEGER NOT NULL, PRIMARY KEY (server_id, referee_identity)) WITHOUT ROWID""",
    # token_referral_id is the referral the request's token names: one token = one referral, so
    # (token_referral_id, event, server_event_id) is the idempotency key. referrer_code: the referral's
    # (it never changes), so a search by code is one index scan; ts: the sender's own event time, as sent
    """CREATE TABLE delivery_log (
        id INTEGER PRIMARY KEY, server_id TEXT NOT NULL, referral_id TEXT NOT NULL,
        token_referral_id TEXT, event TEXT NOT NULL, server_event_id TEXT,
        outcome TEXT NOT NULL, received_at INTEGER NOT NULL, payload TEXT, referrer_code TEXT, ts NUMERIC,
        UNIQUE (token_referral_id, event, server_event_id))""",
    "CREATE INDEX delivery_log_by_server ON delivery_log (server_id, id)",
    "CREATE INDEX delivery_log_by_event ON delivery_log (server_id, event, id)",
    "CREATE INDEX delivery_log_by_outcome ON delivery_log (server_id, outcome, id)",
    "CREATE INDEX delivery_log_by_event_id ON delivery_log (server_id, server_event_id, id)",
    "CREATE INDEX delivery_log_by_code ON delivery_log (server_id, referrer_code, id)",
    "CREATE INDEX delivery_log_by_referral ON delivery_log (referral_id)",
    # identical rejections share one row: how many (repeats), and when the last one came
    """CREATE TABLE rejected_requests (
        id INTEGER PRIMARY KEY, server_id TEXT, status INTEGER NOT NULL, error TEXT NOT NULL,
        reason TEXT, hint TEXT, diagnosis TEXT, snippet TEXT, received_at INTEGER NOT NULL,
        repeats INTEGER NOT NULL DEFAULT 1, last_seen_at INTEGER)""",
    "CREATE INDEX rejected_by_server ON rejected_requests (server_id, id)",
    "CREATE INDEX rejected_by_last_seen ON rejected_requests (server_id, last_seen_at, id)",
    # counters kept in the same transaction as each change, for analytics
    """CREATE TABLE daily_counts (
        server_id TEXT NOT NULL, day TEXT NOT NULL, clicked INTEGER NOT NULL DEFAULT 0,
        registered INTEGER NOT NULL DEFAULT 0, qualified INTEGER NOT NULL DEFAULT 0,
        reversed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (server_id, day)) WITHOUT ROWID""",
    """CREATE TABLE referrer_counts (
        server_id TEXT NOT NULL, referrer_code TEXT NOT NULL, clicked INTEGER NOT NULL DEFAULT 0,
        registered INTEGER NOT NULL DEFAULT 0, qualified INTEGER NOT NULL DEFAULT 0,
        reversed INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (server_id, referrer_code)) WITHOUT ROWID""",
    # the Referrals tab's leaderboard: WHERE server_id = ? AND qualified > 0 ORDER BY qualified DESC
    "CREATE INDEX referrer_counts_by_qualified ON referrer_counts (server_id, qualified DESC, referrer_code)",
    # a dashboard login: the cookie holds only the random id; logout deletes the row, and
    # password_tag (an HMAC of the password's basis) no longer matches once the password changes
    """CREATE TABLE dashboard_sessions (
        session_id TEXT PRIMARY KEY, password_tag TEXT NOT NULL, created_at INTEGER NOT NULL)""",
    # failed logins per client (a keyed hash of the address), counted before the password is checked
    """CREATE TABLE login_failures (
        client TEXT PRIMARY KEY, failures INTEGER NOT NULL, last_at INTEGER NOT NULL)""",
    "CREATE INDEX login_failures_by_weight ON login_failures (failures, last_at)",
    # requests per (scope, client) in the current fixed window: clicks, recorded rejections, logins
    """CREATE TABLE client_hits (
        scope TEXT NOT NULL, client TEXT NOT NULL, window_start INTEGER NOT NULL,
        hits INTEGER NOT NULL, PRIMARY KEY (scope, client))""",
    "CREATE INDEX client_hits_by_window ON client_hits (scope, window_start)",
    # what /metrics reads, counted in the same transaction as the rows they count, so the numbers
    # are exact across worker processes and survive pruning the log; reason '' when a refusal has none
    """CREATE TABLE event_counts (
        server_id TEXT NOT NULL, event TEXT NOT NULL, outcome TEXT NOT NULL, count INTEGER NOT NULL,
        PRIMARY KEY (server_id, event, outcome)) WITHOUT ROWID""",
    """CREATE TABLE rejection_counts (
        status INTEGER NOT NULL, error TEXT NOT NULL, reason TEXT NOT NULL, count INTEGER NOT NULL,
        PRIMARY KEY (status, error, reason)) WITHOUT ROWID""",
    # ingest latency: observations and seconds per histogram bucket (not cumulative)
    """CREATE TABLE ingest_latency (
        le TEXT PRIMARY KEY, count INTEGER NOT NULL, seconds REAL NOT NULL) WITHOUT ROWID""",
]
# What brings a database made by an earlier version to SCHEMA, version by version. A released
# migration never changes (databases ran it). PostgreSQL support began at v6: a later migration
# runs on PostgreSQL too (translated like SCHEMA), so write it in SQL both engines speak.
MIGRATIONS: list[list[str]] = [
    [  # v1: servers, secrets, referrals, anchors, delivery log, rejected requests
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE servers (
            server_id TEXT PRIMARY KEY, game TEXT NOT NULL, name TEXT NOT NULL DEFAULT '',
            registration_url TEXT, identity_field TEXT NOT NULL DEFAULT 'username',
            referrals_enabled INTEGER NOT NULL DEFAULT 1, created_at INTEGER NOT NULL)""",
        """CREATE TABLE secrets (
            kid TEXT PRIMARY KEY, server_id TEXT NOT NULL, secret TEXT NOT NULL,
            created_at INTEGER NOT NULL, expires_at INTEGER)""",
        "CREATE INDEX secrets_by_server ON secrets (server_id, created_at)",
        """CREATE TABLE referrals (
            referral_id TEXT PRIMARY KEY, server_id TEXT NOT NULL, referrer_code TEXT NOT NULL,
            state TEXT NOT NULL, referee_identity TEXT, issued_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL, ip_hash TEXT, user_agent TEXT)""",
        "CREATE INDEX referrals_by_server ON referrals (server_id, issued_at)",
        """CREATE TABLE anchors (
            server_id TEXT NOT NULL, referee_identity TEXT NOT NULL, referral_id TEXT NOT NULL,
            created_at INTEGER NOT NULL, PRIMARY KEY (server_id, referee_identity)) WITHOUT ROWID""",
        """CREATE TABLE delivery_log (
            id INTEGER PRIMARY KEY, server_id TEXT NOT NULL, referral_id TEXT NOT NULL,
            token_referral_id TEXT, event TEXT NOT NULL, server_event_id TEXT,
            outcome TEXT NOT NULL, received_at INTEGER NOT NULL, payload TEXT,
            UNIQUE (token_referral_id, event, server_event_id))""",
        "CREATE INDEX delivery_log_by_server ON delivery_log (server_id, id)",
        """CREATE TABLE rejected_requests (
            id INTEGER PRIMARY KEY, server_id TEXT, status INTEGER NOT NULL, error TEXT NOT NULL,
            reason TEXT, hint TEXT, diagnosis TEXT, snippet TEXT, received_at INTEGER NOT NULL)""",
        "CREATE INDEX rejected_by_server ON rejected_requests (server_id, id)",
    ],
    [  # v2: counters kept in the same transaction as each change, for analytics
        """CREATE TABLE daily_counts (
            server_id TEXT NOT NULL, day TEXT NOT NULL, clicked INTEGER NOT NULL DEFAULT 0,
            registered INTEGER NOT NULL DEFAULT 0, qualified INTEGER NOT NULL DEFAULT 0,
            reversed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (server_id, day)) WITHOUT ROWID""",
        """CREATE TABLE referrer_counts (
            server_id TEXT NOT NULL, referrer_code TEXT NOT NULL, clicked INTEGER NOT NULL DEFAULT 0,
            registered INTEGER NOT NULL DEFAULT 0, qualified INTEGER NOT NULL DEFAULT 0,
            reversed INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (server_id, referrer_code)) WITHOUT ROWID""",
        # backfill from what v1 recorded
        """INSERT INTO daily_counts (server_id, day, clicked)
            SELECT server_id, date(issued_at, 'unixepoch'), count(*) FROM referrals GROUP BY 1, 2""",
        """INSERT INTO daily_counts (server_id, day, registered, qualified, reversed)
            SELECT server_id, date(received_at, 'unixepoch'), sum(event = 'registered'),
                   sum(event = 'qualified'), sum(event = 'reversed')
            FROM delivery_log WHERE outcome IN ('advanced', 'owner_action') GROUP BY 1, 2
            ON CONFLICT (server_id, day) DO UPDATE SET registered = excluded.registered,
                qualified = excluded.qualified, reversed = excluded.reversed""",
        # transitions as logged (like the live counters), not current states: a qualified
        # referral later reversed still counts as qualified, a registered one later rejected as registered
        """INSERT INTO referrer_counts (server_id, referrer_code, clicked, registered, qualified, reversed)
            SELECT r.server_id, r.referrer_code, count(DISTINCT r.referral_id),
                   count(CASE l.event WHEN 'registered' THEN 1 END),
                   count(CASE l.event WHEN 'qualified' THEN 1 END),
                   count(CASE l.event WHEN 'reversed' THEN 1 END)
            FROM referrals r LEFT JOIN delivery_log l
                ON l.referral_id = r.referral_id AND l.outcome IN ('advanced', 'owner_action')
            GROUP BY 1, 2""",
    ],
    [  # v3: what the dashboard's filtered, keyset-paged delivery log searches by, indexed
        "ALTER TABLE delivery_log ADD COLUMN referrer_code TEXT",
        """UPDATE delivery_log SET referrer_code =
            (SELECT referrer_code FROM referrals r WHERE r.referral_id = delivery_log.referral_id)""",
        "CREATE INDEX delivery_log_by_event ON delivery_log (server_id, event, id)",
        "CREATE INDEX delivery_log_by_outcome ON delivery_log (server_id, outcome, id)",
        "CREATE INDEX delivery_log_by_event_id ON delivery_log (server_id, server_event_id, id)",
        "CREATE INDEX delivery_log_by_code ON delivery_log (server_id, referrer_code, id)",
        "CREATE INDEX delivery_log_by_referral ON delivery_log (referral_id)",
        "ALTER TABLE delivery_log ADD COLUMN ts NUMERIC",
        "ALTER TABLE referrals ADD COLUMN anchor_referral_id TEXT",
    ],
    [  # v4: the dashboard's test tokens, and rotations made once per form submission
        "ALTER TABLE referrals ADD COLUMN test INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE secrets ADD COLUMN rotation_nonce TEXT",
        "CREATE UNIQUE INDEX secrets_by_rotation_nonce ON secrets (server_id, rotation_nonce)",
        "ALTER TABLE secrets ADD COLUMN revealed_at INTEGER",
    ],
    [  # v5: limits and sessions kept where every worker process sees them
        """CREATE TABLE dashboard_sessions (
            session_id TEXT PRIMARY KEY, password_tag TEXT NOT NULL, created_at INTEGER NOT NULL)""",
        """CREATE TABLE login_failures (
            client TEXT PRIMARY KEY, failures INTEGER NOT NULL, last_at INTEGER NOT NULL)""",
        "CREATE INDEX login_failures_by_weight ON login_failures (failures, last_at)",
        """CREATE TABLE client_hits (
            scope TEXT NOT NULL, client TEXT NOT NULL, window_start INTEGER NOT NULL,
            hits INTEGER NOT NULL, PRIMARY KEY (scope, client))""",
        "CREATE INDEX client_hits_by_window ON client_hits (scope, window_start)",
        "ALTER TABLE rejected_requests ADD COLUMN repeats INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE rejected_requests ADD COLUMN last_seen_at INTEGER",
        "UPDATE rejected_requests SET last_seen_at = received_at",
        "CREATE INDEX rejected_by_last_seen ON rejected_requests (server_id, last_seen_at, id)",
        "CREATE INDEX referrer_counts_by_qualified ON referrer_counts (server_id, qualified DESC, referrer_code)",
    ],
    [  # v6: what /metrics reads, counted in the same transaction as the rows they count, so the
        # numbers are exact across worker processes and survive pruning the log
        """CREATE TABLE event_counts (
            server_id TEXT NOT NULL, event TEXT NOT NULL, outcome TEXT NOT NULL, count INTEGER NOT NULL,
            PRIMARY KEY (server_id, event, outcome)) WITHOUT ROWID""",
        """INSERT INTO event_counts (server_id, event, outcome, count)
            SELECT server_id, event, outcome, count(*) FROM delivery_log GROUP BY 1, 2, 3""",
        # backfilled from the (capped) list of kept refusals
        """CREATE TABLE rejection_counts (
            status INTEGER NOT NULL, error TEXT NOT NULL, reason TEXT NOT NULL, count INTEGER NOT NULL,
            PRIMARY KEY (status, error, reason)) WITHOUT ROWID""",
        """INSERT INTO rejection_counts (status, error, reason, count)
            SELECT status, error, coalesce(reason, ''), count(*) FROM rejected_requests GROUP BY 1, 2, 3""",
        """CREATE TABLE ingest_latency (
            le TEXT PRIMARY KEY, count INTEGER NOT NULL, seconds REAL NOT NULL) WITHOUT ROWID""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_statements(version: int, where: str) -> list[str]:
    """What brings a database at schema `version` (0: a new one) to SCHEMA_VERSION; a StoreError refuses a
    database that a newer mmoref wrote (`where` names it)."""
    if version > SCHEMA_VERSION:
        raise StoreError(f"{where} was written by a newer mmoref (schema v{version}; this one knows up to"
                         f" v{SCHEMA_VERSION}): upgrade mmoref_server.py")
    if version == 0:
        return SCHEMA
    return [statement for migration in MIGRATIONS[version:] for statement in migration]


# random per-installation values kept in `meta`: what signs tokens, sessions, pseudonymous client keys
INSTALLATION_KEYS = ("token_key", "session_key", "session_binding_key", "ip_salt", "identity_key")
PRUNED_TABLES = ("delivery_log", "rejected_requests")  # what retention deletes; counters stay
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds, as Prometheus
VACUUM_PAGES_PER_STEP = 2000                           # 8 MB of 4 KiB pages per short transaction
# How long a write waits for another process's write lock (the sqlite3 shell, a backup, a stuck worker):
# a request answers 503 "database busy" after REQUEST_BUSY_TIMEOUT instead of holding its thread.
REQUEST_BUSY_TIMEOUT = 3
CLI_BUSY_TIMEOUT = 30            # a CLI command can afford to wait longer
WRITER_IDLE_SECONDS = 5          # an SQLiteStore's writer thread ends after this long without a write
HEALTH_READ_TIMEOUT_MS = 500     # /healthz reads with this busy timeout; it never takes the write lock
HEALTH_CHECK_SECONDS = 1         # /healthz checks the file, folder and disk at most this often
LOW_DISK_BYTES = 1024 * 1024     # less free space than this on the database's filesystem: "disk full"
LOCKED_REMEMBERED_SECONDS = 10   # /healthz reports a write that found the database locked for this long
WRITE_ATTEMPTS = 3               # how often a database server's write that lost a race to another node is tried

# The causes the owner must fix, each with the words SQLite uses for it and the one line
# that says what to do. "deleted" and "replaced" are found by comparing the file's identity.
DATABASE_PROBLEMS: dict[str, tuple[str | None, str]] = {
    "locked": ("database is locked", "{path} is locked by another process (the sqlite3 shell, a backup,"
                                     " another server?): wait for it or stop it"),
    "read-only": ("readonly database", "{path} cannot be written (read-only file, folder or filesystem): mmoref"
                                       " writes it and creates its -wal and -shm files next to it;"
                                       " fix the permissions or the mount"),
    "disk full": ("database or disk is full", "the disk holding {path} is full: free some space"),
    "malformed": ("malformed", "{path} is damaged ({detail}): stop the server and restore a backup"),
    "not a database": ("not a database", "{path} is not a usable SQLite database ({detail}):"
                                         " pass --db with the right file or set MMOREF_DB"),
    "deleted": (None, "{path} was deleted while the server was running: restore it, then restart the server"),
    "replaced": (None, "{path} was replaced while the server was running: restart the server"
                       " (stop the server before restoring a database)"),
}


def _file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, None when there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _cannot_write(path: str) -> bool:
    """The file, its folder or its filesystem refuses writes (the -wal and -shm files go in the folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.access(path, os.W_OK) or not os.access(folder, os.W_OK):
        return True
    return hasattr(os, "statvfs") and bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


def database_error(path: str, problem: str, detail: str = "") -> StoreError:
    """A StoreError whose message is one line: which file, what is wrong, what to do."""
    _, advice = DATABASE_PROBLEMS.get(problem, (None, "{path} cannot be used ({detail})"))
    return StoreError(advice.format(path=os.path.abspath(path), detail=detail), problem)


def _create_private_file(path: str) -> None:
    """Create the database file owner-only (0600) before SQLite touches it."""
    if os.path.exists(path):
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StoreError(f"cannot create {path}: folder {directory} does not exist")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise database_error(path, "read-only" if _cannot_write(path) else "unusable", exc.strerror or "") from None


class _Pending:
    """One caller's share of a group commit: `done` is set once the COMMIT holding it returned."""

    __slots__ = ("work", "result", "error", "done")

    def __init__(self, work: Callable[[Transaction], Any]):
        self.work = work
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class Store(abc.ABC):
    """Every read and write of the server; `open_store(location)` opens the engine the location names.
    The statements here are shared; each engine (SQLiteStore, or one a companion file registers in ENGINES)
    supplies connections, transactions, health, the schema and its few differing statements."""

    NULL_SAFE_EQUAL = "IS"          # `a IS b`: equal, NULL equal to NULL
    CONTAINS = "instr({column}, ?) > 0"   # the column's text holds the parameter
    TRANSACTION: type[Transaction] = Transaction

    def __init__(self, location: str):
        self.location = location
        self._keys: dict[str, str] = {}
        self._latency: dict[str, tuple[int, float]] = {}  # observed, not yet written: le -> (count, seconds)
        self._latency_lock = threading.Lock()

    # What each engine supplies: connections that `.execute(sql with ?, params)` for reads (_reading), in a
    # write transaction committed at the end and rolled back on any exception (_writing), or whose reads all
    # see one moment without taking the write lock (_snapshot). Whatever its driver raises leaves the store as
    # a StoreError whose `problem` names the cause (a WriteConflict when a write lost a race).

    @abc.abstractmethod
    def _reading(self) -> contextlib.AbstractContextManager[Any]: ...
    @abc.abstractmethod
    def _writing(self) -> contextlib.AbstractContextManager[Any]: ...
    @abc.abstractmethod
    def _snapshot(self) -> contextlib.AbstractContextManager[Any]: ...
    @abc.abstractmethod
    def close(self) -> None: ...
    @abc.abstractmethod
    def database_bytes(self) -> int: ...   # the size of the database, as /metrics and prune report it
    @abc.abstractmethod
    def erase_freed_bytes(self) -> None: ...   # leave no deleted or overwritten value in the database's files
    @abc.abstractmethod
    def backup_to(self, path: str) -> None: ...   # copy into the new file `path` (or say how to back up)

    def group_commit(self, work: Callable[[Transaction], Any]) -> Any:
        """Run `work(transaction)` in a write transaction; return its result (or raise its error). Here each is
        its own transaction: a database server's own group commit batches the fsyncs. Work that lost a race to
        another node (WriteConflict: first touch, a deadlock) runs again, in a new transaction that sees the
        winner's rows, up to WRITE_ATTEMPTS times in all."""
        attempts_left = WRITE_ATTEMPTS
        while True:
            try:
                with self.transaction() as transaction:
                    return work(transaction)
            except WriteConflict:
                attempts_left -= 1
                if not attempts_left:
                    raise

    def health(self) -> StoreError | None:
        """What keeps this database from taking writes now, found quickly: here, whether it answers a read."""
        try:
            self._one("SELECT 1 AS up")
        except StoreError as exc:
            return exc
        return None

    def reclaim_space(self, convert: bool) -> bool:
        """Give the space freed by pruning or forgetting back; False when not done (database servers vacuum)."""
        return True

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One write transaction for the state machine (which also writes the ingest latencies observed since)."""
        with self._writing() as db:
            yield self.TRANSACTION(db)
            if self._latency:
                self._write_latency(db)

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._reading() as db:
            return db.execute(sql, params).fetchall()

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        with self._reading() as db:
            return db.execute(sql, params).fetchone()

    def _load_installation_keys(self) -> None:
        marks = ", ".join("?" * len(INSTALLATION_KEYS))
        self._keys.update((row["key"], row["value"]) for row in self._all(
            f"SELECT key, value FROM meta WHERE key IN ({marks})", INSTALLATION_KEYS))
        for name in INSTALLATION_KEYS:
            self.installation_key(name)  # makes the missing ones (on a new database)

    def installation_key(self, name: str) -> str:
        """A random per-installation value (INSTALLATION_KEYS), made once. All are made when the store opens,
        so a request never needs the write lock (which another process may hold) just to read one."""
        if name not in self._keys:
            with self._writing() as db:
                db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                           (name, secrets.token_urlsafe(32)))
                self._keys[name] = db.execute("SELECT value FROM meta WHERE key = ?", (name,)).fetchone()["value"]
        return self._keys[name]

    @property
    def token_key(self) -> str:
        return self.installation_key("token_key")

    @property
    def identity_key(self) -> str:
        """The key of forgotten_form: forgetting a player keeps first touch, never the identity."""
        return self.installation_key("identity_key")

    # servers and secrets

    def server(self, server_id: str) -> Row | None:
        return self._one("SELECT * FROM servers WHERE server_id = ?", (server_id,))

    def servers(self) -> list[Row]:
        return self._all("SELECT * FROM servers ORDER BY game, server_id")

    def add_server(self, server_id: str, game: str, name: str = "", registration_url: str | None = None,
                   identity_field: str = "username") -> tuple[str, str]:
        """Create a server with referrals enabled; return its first (secret, kid)."""
        check_path_segment("server id", server_id)
        check_path_segment("game", game)
        if registration_url:
            registration_url = check_registration_url(registration_url)
        if identity_field not in IDENTITY_FIELDS:
            raise ConfigError(f"identity field must be one of {', '.join(IDENTITY_FIELDS)}")
        with self.transaction() as transaction:
            if transaction.server_exists(server_id):
                raise ConfigError(f"server {server_id!r} already exists")
            transaction.db.execute("INSERT INTO servers (server_id, game, name, registration_url, identity_field,"
                                   " referrals_enabled, created_at) VALUES (?, ?, ?, ?, ?, 1, ?)",
                                   (server_id, game, name, registration_url or None, identity_field, now()))
            return self._new_secret(transaction.db, server_id, grace=0)

    def update_server(self, server_id: str, **changes: Any) -> None:
        """Set registration_url, identity_field, name or referrals_enabled."""
        allowed = {"registration_url", "identity_field", "name", "referrals_enabled"}
        if not changes or not set(changes) <= allowed:
            raise ValueError(f"can only change {sorted(allowed)}")
        assignments = ", ".join(f"{column} = ?" for column in changes)
        with self._writing() as db:
            db.execute(f"UPDATE servers SET {assignments} WHERE server_id = ?", (*changes.values(), server_id))

    def rotate_secret(self, server_id: str, grace: int = DEFAULT_GRACE_SECONDS) -> tuple[str, str]:
        """A new current secret; the old one stays valid `grace` seconds (0 = revoked now)."""
        if grace < 0:
            raise ConfigError("grace must be 0 (revoke now) or a positive number of seconds")
        with self.transaction() as transaction:
            if not transaction.lock_server(server_id):
                raise ConfigError(f"unknown server {server_id!r}")
            return self._new_secret(transaction.db, server_id, grace)

    def rotate_secret_once(self, server_id: str, grace: int, nonce: str) -> tuple[str, bool]:
        """Rotate unless a rotation with this form's `nonce` was made: (its kid, whether it is new). The nonce
        is written with the new secret, so a form sent twice (two clicks, two worker processes) rotates once."""
        with self.transaction() as transaction:
            if not transaction.lock_server(server_id):
                raise ConfigError(f"unknown server {server_id!r}")
            made = transaction.db.execute("SELECT kid FROM secrets WHERE server_id = ? AND rotation_nonce = ?",
                                          (server_id, nonce)).fetchone()
            if made is not None:
                return made["kid"], False
            return self._new_secret(transaction.db, server_id, grace, nonce)[1], True

    def reveal_secret(self, server_id: str, kid: str) -> str | None:
        """The secret `kid` names the first time the dashboard asks for it; None ever after."""
        with self._writing() as db:
            rows = db.execute("UPDATE secrets SET revealed_at = ? WHERE server_id = ? AND kid = ?"
                              " AND revealed_at IS NULL RETURNING secret", (now(), server_id, kid)).fetchall()
        return rows[0]["secret"] if rows else None

    @staticmethod
    def _new_secret(db: Any, server_id: str, grace: int, nonce: str | None = None) -> tuple[str, str]:
        at = now()
        # Two live secrets: one still in its grace period is revoked now. Unless the current secret is
        # seconds old (a double click, a click on the last rotation's result page): no game server can
        # have taken it up yet, so the one they use keeps its grace ("revoke now" revokes it all the same).
        settling = grace and db.execute("SELECT 1 FROM secrets WHERE server_id = ? AND expires_at IS NULL"
                                        " AND created_at > ?", (server_id, at - ROTATION_SETTLE)).fetchone()
        if not settling:
            db.execute("UPDATE secrets SET expires_at = ? WHERE server_id = ? AND expires_at > ?",
                       (at, server_id, at))
        db.execute("UPDATE secrets SET expires_at = ? WHERE server_id = ? AND expires_at IS NULL",
                   (at + grace, server_id))
        secret, kid = "mmsk_" + secrets.token_urlsafe(32), "k_" + secrets.token_hex(4)
        db.execute("INSERT INTO secrets (kid, server_id, secret, created_at, rotation_nonce) VALUES (?, ?, ?, ?, ?)",
                   (kid, server_id, secret, at, nonce))
        return secret, kid

    def set_secret(self, server_id: str, secret: str) -> None:
        """Give the server's secrets this value (the demo's well-known secret)."""
        with self._writing() as db:
            db.execute("UPDATE secrets SET secret = ? WHERE server_id = ?", (secret, server_id))

    def live_secrets(self, server_id: str, at: int) -> list[tuple[str, str]]:
        """[(kid, secret), ...] valid at `at`, current first (two; more just after rotations seconds apart)."""
        return live_secrets(self._all(Transaction.SECRETS_NEWEST_FIRST), server_id, at)

    def all_secrets(self) -> list[str]:
        """Every secret of the installation, live or not: what a stored snippet must never hold."""
        return [row["secret"] for row in self._all("SELECT secret FROM secrets")]

    def secret_summaries(self, server_id: str) -> list[Row]:
        """kid, last four characters and validity of each secret: never the secret itself."""
        return self._all(
            "SELECT kid, substr(secret, length(secret) - 3) AS last4, created_at, expires_at FROM secrets"
            " WHERE server_id = ? ORDER BY created_at DESC, rowid DESC", (server_id,))

    # referrals

    @overload
    def mint_referral(self, server_id: str, referrer_code: str, ip_hash: str | None = None,
                      user_agent: str | None = None, issued_at: int | None = None,
                      test: bool = False, click_limit: None = None) -> tuple[str, str]: ...

    @overload   # only a click under a limit may be refused
    def mint_referral(self, server_id: str, referrer_code: str, ip_hash: str | None = None,
                      user_agent: str | None = None, issued_at: int | None = None,
                      test: bool = False, *, click_limit: tuple[str, int]) -> tuple[str, str] | None: ...

    def mint_referral(self, server_id: str, referrer_code: str, ip_hash: str | None = None,
                      user_agent: str | None = None, issued_at: int | None = None,
                      test: bool = False, click_limit: tuple[str, int] | None = None) -> tuple[str, str] | None:
        """Record a click and return (token, referral_id); a `test` one is left out of analytics. With
        `click_limit` (client key, clicks a minute), a client past it gets None and only its counter is written."""
        check_name("referrer code", referrer_code)
        issued_at = now() if issued_at is None else issued_at

        def click(transaction: Transaction) -> str | None:
            if not transaction.server_exists(server_id):
                raise ConfigError(f"unknown server {server_id!r}")
            if click_limit is not None and transaction.hit("click", click_limit[0], issued_at, 60) > click_limit[1]:
                return None
            return transaction.insert_referral(server_id, referrer_code, issued_at, ip_hash, user_agent, test)

        referral_id = self.group_commit(click)
        if referral_id is None:
            return None
        return mint_token(self.token_key, server_id, referral_id, issued_at), referral_id

    def referral(self, referral_id: str) -> Row | None:
        return self._one("SELECT * FROM referrals WHERE referral_id = ?", (referral_id,))

    # delivery log

    _LOG_SELECT = ("SELECT l.*, r.state, r.referrer_code, r.referee_identity FROM delivery_log l"
                   " JOIN referrals r ON r.referral_id = l.referral_id")

    def delivery_log(self, server_id: str, limit: int = 100, before_id: int | None = None,
                     after_id: int | None = None, event: str | None = None, outcome: str | None = None,
                     q: str | None = None) -> list[Row]:
        """Accepted events, newest first, each with its referral's current state; keyset-paged (`before_id`
        gives older rows, `after_id` newer ones). `q` matches a server_event_id or a referrer code exactly."""
        conditions: list[tuple[str, Any]] = [("l.server_id = ?", server_id)] + [
            (clause, value) for clause, value in (("l.id < ?", before_id), ("l.id > ?", after_id),
                                                  ("l.event = ?", event), ("l.outcome = ?", outcome))
            if value is not None and value != ""]
        newer = after_id is not None  # then the rows just above after_id, read upwards
        # `q`: a server_event_id or a referrer code, two index range scans merged
        searches = [[("l.server_event_id = ?", q)], [("l.referrer_code = ?", q)]] if q else [[]]
        found: dict[int, Row] = {}
        for search in searches:
            where = conditions + search
            found.update((row["id"], row) for row in self._all(
                f"{self._LOG_SELECT} WHERE {' AND '.join(clause for clause, _ in where)}"
                f" ORDER BY l.id {'ASC' if newer else 'DESC'} LIMIT ?", (*(value for _, value in where), limit)))
        rows = sorted(found.values(), key=lambda row: -row["id"])
        return rows[-limit:] if newer else rows[:limit]

    def delivery_log_row(self, server_id: str, row_id: int) -> Row | None:
        return self._one(f"{self._LOG_SELECT} WHERE l.server_id = ? AND l.id = ?", (server_id, row_id))

    def referral_history(self, referral_id: str) -> list[Row]:
        """Every log row about a referral, oldest first (including second clicks of its token)."""
        return self._all(f"{self._LOG_SELECT} WHERE l.referral_id = ? OR l.token_referral_id = ?"
                         " ORDER BY l.id", (referral_id, referral_id))

    # analytics: the counter tables, kept in the same transaction as each change

    def funnels(self) -> dict[str, Row]:
        """Every server's all-time clicked, registered, qualified and reversed counts, by server id."""
        return {row["server_id"]: row for row in self._all(
            "SELECT server_id, sum(clicked) AS clicked, sum(registered) AS registered, sum(qualified) AS qualified,"
            " sum(reversed) AS reversed FROM daily_counts GROUP BY server_id")}

    def funnel(self, server_id: str) -> Row:
        """One server's all-time clicked, registered, qualified and reversed counts (0 when none)."""
        return self._all(
            "SELECT coalesce(sum(clicked), 0) AS clicked, coalesce(sum(registered), 0) AS registered,"
            " coalesce(sum(qualified), 0) AS qualified, coalesce(sum(reversed), 0) AS reversed"
            " FROM daily_counts WHERE server_id = ?", (server_id,))[0]   # (an aggregate: one row)

    def leaders(self, server_id: str, limit: int = 20) -> list[Row]:
        """The referrers with qualified referrals, most first."""
        return self._all(
            "SELECT referrer_code, clicked, registered, qualified FROM referrer_counts"
            " WHERE server_id = ? AND qualified > 0 ORDER BY qualified DESC, referrer_code LIMIT ?",
            (server_id, limit))

    def daily_counts(self, server_id: str, first_day: str) -> dict[str, Row]:
        """Clicked, registered and qualified per UTC day (YYYY-MM-DD) from `first_day`; days without any are absent."""
        return {row["day"]: row for row in self._all(
            "SELECT day, clicked, registered, qualified FROM daily_counts WHERE server_id = ? AND day >= ?",
            (server_id, first_day))}

    # dashboard password, sessions and failed logins: in the database, so every worker process sees them

    def admin_password_hash(self) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = 'admin_password_hash'")
        return row["value"] if row else None

    def set_admin_password(self, password: str) -> None:
        """Store the password's salted hash and log every dashboard session out."""
        if len(password) < 8:
            raise ConfigError("the dashboard password must have at least 8 characters")
        with self._writing() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('admin_password_hash', ?) ON CONFLICT (key)"
                       " DO UPDATE SET value = excluded.value", (generate_password_hash(password),))
            db.execute("DELETE FROM dashboard_sessions")

    def open_session(self, password_tag: str, at: int, lifetime: int) -> str:
        """A new dashboard session bound to the password (by its tag); return its random id."""
        session_id = secrets.token_urlsafe(32)
        with self._writing() as db:
            db.execute("DELETE FROM dashboard_sessions WHERE created_at <= ?", (at - lifetime,))
            db.execute("INSERT INTO dashboard_sessions (session_id, password_tag, created_at) VALUES (?, ?, ?)",
                       (session_id, password_tag, at))
        return session_id

    def session_password_tag(self, session_id: str, not_before: int) -> str | None:
        """The password tag a live session was opened under; None when it is closed or older than `not_before`."""
        row = self._one("SELECT password_tag FROM dashboard_sessions WHERE session_id = ? AND created_at > ?",
                        (session_id, not_before))
        return row["password_tag"] if row else None

    def close_session(self, session_id: str) -> None:
        with self._writing() as db:
            db.execute("DELETE FROM dashboard_sessions WHERE session_id = ?", (session_id,))

    def forget_login_failures(self, client: str) -> None:
        with self._writing() as db:
            db.execute("DELETE FROM login_failures WHERE client = ?", (client,))

    def login_failed_at(self, client: str, at: int) -> None:
        """Date the client's last failure from its answer, after the (slow) password check."""
        with self._writing() as db:
            db.execute("UPDATE login_failures SET last_at = ? WHERE client = ? AND last_at < ?", (at, client, at))

    # rejected requests

    def record_rejected(self, server_id: str | None, status: int, error: str, reason: str | None,
                        hint: str, diagnosis: str | None, snippet: str, *, client: str | None = None,
                        per_client_minute: int | None = None) -> None:
        """Remember a refused request, keeping the most recently seen kinds per server: one identical to a kept
        one (status, error, reason, hint, diagnosis) adds to its `repeats` and takes the newer snippet. With
        `per_client_minute`, a client past that many this minute is not recorded at all."""
        same_kind = (f"server_id {self.NULL_SAFE_EQUAL} ? AND status = ? AND error = ? AND reason"
                     f" {self.NULL_SAFE_EQUAL} ? AND hint = ? AND diagnosis {self.NULL_SAFE_EQUAL} ?")

        def remember(transaction: Transaction) -> None:
            at, db = now(), transaction.db
            db.execute("INSERT INTO rejection_counts (status, error, reason, count) VALUES (?, ?, ?, 1)"
                       " ON CONFLICT (status, error, reason) DO UPDATE SET count = rejection_counts.count + 1",
                       (status, error, reason or ""))  # every refusal counts, kept or not
            if per_client_minute is not None and client is not None \
                    and transaction.hit("rejected", client, at, 60) > per_client_minute:
                return
            same = db.execute(f"SELECT id FROM rejected_requests WHERE {same_kind} ORDER BY id DESC LIMIT 1",
                              (server_id, status, error, reason, hint, diagnosis)).fetchone()
            if same is not None:
                db.execute("UPDATE rejected_requests SET repeats = repeats + 1, last_seen_at = ?, snippet = ?"
                           " WHERE id = ?", (at, snippet, same["id"]))
                return
            db.execute("INSERT INTO rejected_requests (server_id, status, error, reason, hint, diagnosis,"
                       " snippet, received_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (server_id, status, error, reason, hint, diagnosis, snippet, at, at))
            db.execute(f"DELETE FROM rejected_requests WHERE id IN (SELECT id FROM rejected_requests WHERE"
                       f" server_id {self.NULL_SAFE_EQUAL} ? ORDER BY last_seen_at DESC, id DESC LIMIT ? OFFSET ?)",
                       (server_id, 2**31, REJECTED_KEPT_PER_SERVER))
        self.group_commit(remember)

    def rejected_requests(self, server_id: str | None, limit: int = 50) -> list[Row]:
        """The kept refusals, most recently seen first."""
        return self._all(f"SELECT * FROM rejected_requests WHERE server_id {self.NULL_SAFE_EQUAL} ?"
                         " ORDER BY last_seen_at DESC, id DESC LIMIT ?", (server_id, limit))

    # metrics: counters written in the same transactions as what they count

    def observe_latency(self, seconds: float) -> None:
        """Remember one ingest latency; it is written with the next commit (or read of /metrics)."""
        le = next((str(bound) for bound in LATENCY_BUCKETS if seconds <= bound), "+Inf")
        with self._latency_lock:
            count, total = self._latency.get(le, (0, 0.0))
            self._latency[le] = (count + 1, total + seconds)

    def _write_latency(self, db: Any) -> None:
        with self._latency_lock:
            pending, self._latency = self._latency, {}
        for le, (count, total) in sorted(pending.items()):  # one order: no deadlock between nodes
            db.execute("INSERT INTO ingest_latency (le, count, seconds) VALUES (?, ?, ?) ON CONFLICT (le)"
                       " DO UPDATE SET count = ingest_latency.count + excluded.count,"
                       " seconds = ingest_latency.seconds + excluded.seconds", (le, count, total))

    def metrics(self) -> dict[str, Any]:
        """What /metrics shows: every counter table, read in one snapshot (this process's pending latencies
        written first)."""
        if self._latency:
            with self._writing() as db:
                self._write_latency(db)
        with self._snapshot() as db:
            def rows(sql: str) -> list[tuple]:
                return [tuple(dict(row).values()) for row in db.execute(sql).fetchall()]  # (by column: any Row)

            return {
                "events": rows("SELECT server_id, event, outcome, count FROM event_counts ORDER BY 1, 2, 3"),
                "rejections": rows("SELECT status, error, reason, count FROM rejection_counts ORDER BY 1, 2, 3"),
                "clicks": rows("SELECT server_id, sum(clicked) AS clicks FROM daily_counts GROUP BY 1 ORDER BY 1"),
                "latency": dict(rows("SELECT le, count FROM ingest_latency")),
                "latency_seconds": rows("SELECT coalesce(sum(seconds), 0) AS total FROM ingest_latency")[0][0],
                "last_event_at": rows("SELECT max(received_at) AS at FROM delivery_log WHERE id ="
                                      " (SELECT max(id) FROM delivery_log)")[0][0],
            }

    # retention and forgetting

    def prune_batch(self, table: str, before: int, limit: int) -> int:
        """Delete up to `limit` of the oldest rows of `table` (one of PRUNED_TABLES) received before `before`, in
        one short transaction; return how many. Found from the lowest id up, where old rows are."""
        if table not in PRUNED_TABLES:
            raise ValueError(f"only {PRUNED_TABLES} are pruned")
        with self._writing() as db:
            return db.execute(f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table}"
                              " WHERE received_at < ? ORDER BY id LIMIT ?)", (before, limit)).rowcount

    def forget_identity(self, server_id: str, identity: str, forgotten: str,
                        spellings: Sequence[str]) -> tuple[dict[str, int], list[int], bool]:
        """Replace a referee identity by its forgotten form in one transaction: in referrals and anchors (the
        whole value), and in stored payloads and rejected snippets (any of `spellings`, or, at the end of a text
        cut short, the start of one at least CUT_IDENTITY_MIN_CHARS long). Returns the rows changed per table,
        the ids of the server's log rows whose server_event_id holds the identity (kept as is), and, when no
        row changed, whether the forgotten form is stored (as an anchored identity, in a payload or snippet)."""
        def scrub(text: str, cut_at: int) -> str:
            was_cut = len(text) >= cut_at
            for spelling in spellings:
                text = text.replace(spelling, forgotten)
            for spelling in spellings if was_cut else ():
                for length in range(len(spelling) - 1, CUT_IDENTITY_MIN_CHARS - 1, -1):
                    if text.endswith(spelling[:length]):
                        return text[:-length] + forgotten
            return text

        contains = self.CONTAINS.format
        with self._writing() as db:
            changed = {table: db.execute(f"UPDATE {table} SET referee_identity = ?"
                                         " WHERE server_id = ? AND referee_identity = ?",
                                         (forgotten, server_id, identity)).rowcount
                       for table in ("referrals", "anchors")}
            for table, column, scope, cut_at in (
                    ("delivery_log", "payload", "server_id = ? AND ", DELIVERY_PAYLOAD_CHARS),
                    ("rejected_requests", "snippet", "", REJECTED_SNIPPET_CHARS)):
                mentions = " OR ".join([contains(column=column)] * len(spellings))
                params = ((server_id,) if scope else ()) + tuple(spellings) + (cut_at,)  # (cut: maybe in a spelling)
                found = db.execute(f"SELECT id, {column} FROM {table} WHERE {scope}"
                                   f"({mentions} OR length({column}) >= ?)", params).fetchall()
                changed[table] = 0
                for row in found:
                    scrubbed = scrub(row[column], cut_at)
                    if scrubbed != row[column]:
                        db.execute(f"UPDATE {table} SET {column} = ? WHERE id = ?", (scrubbed, row["id"]))
                        changed[table] += 1
            kept = [row["id"] for row in db.execute(
                f"SELECT id FROM delivery_log WHERE server_id = ? AND {contains(column='server_event_id')} ORDER BY id",
                (server_id, identity)).fetchall()]
            stored = not any(changed.values()) and db.execute(
                "SELECT 1 AS found FROM anchors WHERE server_id = ? AND referee_identity = ?"
                f" UNION ALL SELECT 1 FROM delivery_log WHERE server_id = ? AND {contains(column='payload')}"
                f" UNION ALL SELECT 1 FROM rejected_requests WHERE {contains(column='snippet')} LIMIT 1",
                (server_id, forgotten, server_id, forgotten, forgotten)).fetchone() is not None
        return changed, kept, stored


# Which store opens a location: a path is a SQLite file (SQLiteStore); a URL opens the engine registered
# in ENGINES for its scheme, which a companion file registers when loaded, the first time a location names it.
ENGINES: dict[str, Callable[[str, float], Store]] = {}   # URL scheme -> store class (location, busy_timeout)
ENGINE_COMPANIONS = {"postgresql": "mmoref_postgres.py", "postgres": "mmoref_postgres.py"}  # scheme -> its file
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(location: str) -> str | None:
    """The scheme of a database URL that an engine is known for ("postgresql"); None for a SQLite file."""
    match = _URL_SCHEME.match(location)
    scheme = match.group(1).lower() if match else None
    return scheme if scheme in ENGINES or scheme in ENGINE_COMPANIONS else None


def is_database_url(location: str) -> bool:
    """MMOREF_DB names a database server (a URL) rather than a SQLite file."""
    return url_scheme(location) is not None


def database_label(location: str) -> str:
    """Where the data lives, to show: a SQLite file's full path, or the URL without its password."""
    if not is_database_url(location):
        return os.path.abspath(location)
    parts = urllib.parse.urlsplit(location)
    if parts.password is None:
        return location
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":…@", 1)))


def open_store(location: str, *, synchronous: str = "FULL", busy_timeout: float = CLI_BUSY_TIMEOUT) -> Store:
    """The store of a SQLite file or a database URL, open (created or migrated); a StoreError says what is
    wrong. `synchronous` is SQLite's (MMOREF_SYNCHRONOUS); `busy_timeout` is how long a write waits for
    another process's lock (SQLite) or for a pooled connection (a database server)."""
    scheme = url_scheme(location)
    if scheme is None:
        return SQLiteStore(location, synchronous, busy_timeout)
    if scheme not in ENGINES:
        load_companion(ENGINE_COMPANIONS[scheme], f"a {scheme}:// database")
    return ENGINES[scheme](location, busy_timeout)


def load_companion(filename: str, needed_for: str) -> None:
    """Import a companion file beside this one, which registers what it brings (an engine, a command);
    without the file, a StoreError names it."""
    # Run as `python mmoref_server.py`, this module is __main__: the companion's `import mmoref_server`
    # must find it, not load a second copy with registries of its own that nothing here reads.
    sys.modules.setdefault("mmoref_server", sys.modules[__name__])
    module = filename.removesuffix(".py")
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as missing:
        if missing.name != module:
            raise
        folder = Path(__file__).resolve().parent
        raise StoreError(f"{needed_for} needs {filename}, which is not beside mmoref_server.py in {folder}:"
                         " copy it there from the same mmoref release") from None


class SQLiteStore(Store):
    """The default engine: one SQLite file in WAL mode. Reads use one connection per thread; every write
    transaction runs on one writing connection (BEGIN IMMEDIATE) under one lock per process, so the UNIQUE
    constraints and the read-then-write checks hold across threads and worker processes."""

    def __init__(self, path: str, synchronous: str = "FULL", busy_timeout: float = CLI_BUSY_TIMEOUT):
        """Open (creating when missing), check and migrate the database; a StoreError says what is wrong."""
        if path == ":memory:":  # each connection would see a database of its own, and every referral is lost at exit
            raise StoreError(":memory: cannot hold mmoref's database: name a file (the default is referrals.db)")
        super().__init__(path)
        self.path = path
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout
        self._pid = 0
        self._forget_parent_process()  # sets up this process's connections, lock and writer queue
        self._write_failure: tuple[str, float] | None = None   # (problem, monotonic time) of the last write
        self._damage: str | None = None   # SQLite's words when a read or write found the file malformed
        self._health: tuple[float, StoreError | None] = (-math.inf, None)  # (monotonic time, what /healthz said)
        _create_private_file(path)
        self._identity = _file_identity(path)
        # mode=rw: a deleted file is never silently re-created empty by a new thread's connection
        self._uri = Path(os.path.abspath(path)).as_uri() + "?mode=rw"
        try:
            db = self.connect()
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect only on a new, empty file
            db.execute("PRAGMA journal_mode = WAL")  # kept in the file: every later connection is in WAL mode
            found = db.execute("PRAGMA quick_check(1)").fetchone()[0]  # a damaged file is refused, not served
            if found != "ok":
                raise database_error(self.path, "malformed", "quick_check: " + " ".join(found.split()))
            with self._writing() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                for statement in schema_statements(version, self.path):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._load_installation_keys()
        except sqlite3.Error as exc:
            raise self.error_for(exc) from None

    def error_for(self, exc: sqlite3.Error) -> StoreError:
        """The one-line StoreError for an SQLite error on this database."""
        return database_error(self.path, self.problem_of(exc), str(exc))

    @contextlib.contextmanager
    def _store_errors(self) -> Iterator[None]:
        """The store's boundary: an SQLite error leaves it as the StoreError that says what is wrong."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self.error_for(exc) from exc

    def problem_of(self, exc: sqlite3.Error | StoreError) -> str:
        """Which of DATABASE_PROBLEMS `exc` means ("unusable" when none). Damage is remembered for /healthz:
        it does not heal, and most of it is found only by the request that reads the damaged pages."""
        if isinstance(exc, StoreError):
            return self.moved() or exc.problem
        problem = self.moved() or next((name for name, (words, _) in DATABASE_PROBLEMS.items()
                                        if words and words in str(exc)), None)
        if problem is None:  # "unable to open database file", and the like
            problem = "read-only" if _cannot_write(self.path) else "unusable"
        if problem == "malformed":
            self._damage = str(exc)
        return problem

    def moved(self) -> str | None:
        """"deleted" or "replaced" when the path no longer names the file opened at start, else None."""
        if self._identity is None:
            return None
        identity = _file_identity(self.path)
        if identity == self._identity:
            return None
        return "deleted" if identity is None else "replaced"

    # connections and transactions

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self._uri, uri=True, isolation_level=None, timeout=self.busy_timeout,
                                 check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA synchronous = {self.synchronous}")
        except sqlite3.DatabaseError as exc:
            raise self.error_for(exc) from None
        return db

    def connect(self) -> sqlite3.Connection:
        """This thread's connection for reads (a forked worker opens its own)."""
        self._forget_parent_process()
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._open()
        return db

    def _forget_parent_process(self) -> None:
        """In a new process (a forked worker: it opens its own connections), drop those of the parent."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._local = threading.local()
            # The threads of a process write one at a time: they queue on this lock and wake as soon as it is
            # free, where SQLite's busy handler would have them sleep and poll. Processes meet at SQLite's lock.
            self._write_lock = threading.Lock()
            self._write_db: sqlite3.Connection | None = None  # whose page cache stays warm between writes
            self._queue: list[_Pending] = []    # group_commit's work, waiting for the writer thread
            self._queued = threading.Condition()
            self._writer_thread: threading.Thread | None = None

    def close(self) -> None:
        """Close this thread's connection and the writing one (both open again when next used)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
        with self._write_lock:
            if self._write_db is not None:
                self._write_db.close()
                self._write_db = None

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._store_errors():
            yield self.connect()

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        with self._store_errors():
            db = self.connect()
            if db.in_transaction:  # this thread's open transaction already reads one moment
                yield db
                return
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")

    @contextlib.contextmanager
    def _writer(self) -> Iterator[sqlite3.Connection]:
        """The writing connection, this thread's alone until the block ends."""
        self._forget_parent_process()
        with self._store_errors(), self._write_lock:
            if self._write_db is None:
                self._write_db = self._open()
            yield self._write_db

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (a failed COMMIT too). Nothing is committed
        into a file the path no longer names (one os.stat, ~1 µs): a restore by `mv` or a deletion while
        serving gets StoreError "replaced"/"deleted"."""
        with self._writer() as db:
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    moved = self.moved()
                    if moved:
                        error = database_error(self.path, moved)
                        if self._write_failure is None or self._write_failure[0] != moved:  # logged once
                            log.error("%s", error)
                        raise error
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:  # SQLite may already have rolled back after an I/O error
                        db.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, StoreError) as exc:
                if not isinstance(exc, sqlite3.IntegrityError):  # a constraint is the caller's business
                    self._write_failure = (self.problem_of(exc), time.monotonic())  # /healthz says so at once
                raise
        if self._write_failure is not None:  # a write succeeds again: /healthz looks afresh
            self._write_failure, self._health = None, (-math.inf, None)

    def group_commit(self, work: Callable[[Transaction], Any]) -> Any:
        """Run `work(transaction)` in a write transaction shared with concurrent callers; return its result, or
        raise its error, once the COMMIT holding it returned. An event changes a dozen pages, half of them the
        same for every event (counters, the ends of the log's indexes): one writer thread runs the work queued
        meanwhile in one transaction and commits once, so those pages and the disk wait are paid per batch."""
        pending = _Pending(work)
        self._forget_parent_process()
        with self._queued:
            self._queue.append(pending)
            if self._writer_thread is None:
                self._writer_thread = threading.Thread(target=self._write_queued, name="mmoref-writer", daemon=True)
                self._writer_thread.start()
            self._queued.notify()
        pending.done.wait()
        if pending.error is not None:
            with self._store_errors():  # an SQLite error, as the StoreError it means
                raise pending.error
        return pending.result

    def _write_queued(self) -> None:
        """The writer thread: commit what is queued, batch after batch; end after WRITER_IDLE_SECONDS
        without work, so an idle Store holds no thread (and a dying one lets the next write start another)."""
        try:
            while True:
                with self._queued:
                    if not self._queue:
                        self._queued.wait(WRITER_IDLE_SECONDS)
                    if not self._queue:
                        self._writer_thread = None
                        return
                    batch, self._queue = self._queue, []
                self._commit_batch(batch)
        finally:
            with self._queued:
                if self._writer_thread is threading.current_thread():
                    self._writer_thread = None

    def _commit_batch(self, batch: list[_Pending]) -> None:
        """One transaction, each piece of work in its own SAVEPOINT: one that raises is undone alone."""
        try:
            with self.transaction() as transaction:
                db = transaction.db
                for item in batch:
                    db.execute("SAVEPOINT work")
                    try:
                        item.result = item.work(transaction)
                    except Exception as exc:
                        item.error = exc
                        if not db.in_transaction:  # SQLite rolled the whole transaction back (disk full, I/O error)
                            raise
                        db.execute("ROLLBACK TO work")
                    db.execute("RELEASE work")
        except BaseException as exc:  # BEGIN or COMMIT failed, or SQLite rolled everything back: nothing was written
            for item in batch:
                if item.error is None:  # a piece that raised keeps its own error: it had nothing to write
                    item.result, item.error = None, exc
            if not isinstance(exc, Exception):  # SystemExit, KeyboardInterrupt: the thread ends, its callers know
                raise
        finally:
            for item in batch:
                item.done.set()

    def health(self) -> StoreError | None:
        """What keeps this database from taking writes, found without the write lock. What a write ran into is
        known at once (a lock for LOCKED_REMEMBERED_SECONDS); the file, folder, disk and a read cost a few system
        calls, made at most once every HEALTH_CHECK_SECONDS, so /healthz answers nearly as cheaply as a no-op."""
        known = "malformed" if self._damage else None
        if known is None and self._write_failure is not None:
            problem, at = self._write_failure
            if problem != "locked" or time.monotonic() - at <= LOCKED_REMEMBERED_SECONDS:
                known = problem
        if known:
            return database_error(self.path, self.moved() or known, self._damage or "")
        checked_at, found = self._health
        if time.monotonic() - checked_at >= HEALTH_CHECK_SECONDS:
            found = self._check_file()
            self._health = (time.monotonic(), found)
        return found

    def _check_file(self) -> StoreError | None:
        problem = self.moved()
        if problem is None and self._identity is not None:
            if _cannot_write(self.path):
                problem = "read-only"
            elif hasattr(os, "statvfs"):
                disk = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
                problem = "disk full" if disk.f_bavail * disk.f_frsize < LOW_DISK_BYTES else None
        if problem:
            return database_error(self.path, problem)
        try:
            db = self.connect()
            db.execute(f"PRAGMA busy_timeout = {HEALTH_READ_TIMEOUT_MS}")
            try:
                db.execute("SELECT count(*) FROM meta").fetchone()
            finally:
                db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        except (sqlite3.Error, StoreError) as exc:
            return exc if isinstance(exc, StoreError) else self.error_for(exc)
        return None

    # SQLite only: files, copies and space

    def database_bytes(self) -> int:
        """The size of the database file and its write-ahead log."""
        return sum(os.path.getsize(self.path + suffix) for suffix in ("", "-wal")
                   if os.path.exists(self.path + suffix))

    def backup_to(self, path: str) -> None:
        """Copy the database into the new file `path` (one file, no -wal), all pages in one step from one read
        snapshot: in WAL mode it blocks no writer, where a stepped backup restarts whenever another writes."""
        _create_private_file(path)
        with self._store_errors(), contextlib.closing(sqlite3.connect(path, isolation_level=None)) as copy:
            self.connect().backup(copy)
            copy.execute("PRAGMA journal_mode = DELETE")

    @staticmethod
    def check_copy(path: str) -> dict[str, int]:
        """Check a backup (or any mmoref database file) without changing it; its row counts. A StoreError
        says what is wrong: not SQLite, damaged, not mmoref's, or newer than us."""
        if not os.path.isfile(path):
            raise StoreError(f"{path} is not a file")
        try:
            with contextlib.closing(sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)) as db:
                problems = [row[0] for row in db.execute("PRAGMA integrity_check")]
                if problems != ["ok"]:
                    raise StoreError(f"{path} fails the integrity check: {'; '.join(problems[:3])}")
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if not 1 <= version <= SCHEMA_VERSION:
                    raise StoreError(f"{path} is not an mmoref database this version can use (schema v{version})")
                return {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                        for table in ("servers", "referrals", "anchors", "delivery_log", "rejected_requests")}
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path} is not a usable SQLite database ({exc})") from None

    @staticmethod
    def take_offline(path: str) -> None:
        """Fold the write-ahead log into `path` and leave it a single file, or raise StoreError
        when another process (a running server) has the database open."""
        try:
            with contextlib.closing(sqlite3.connect(path, isolation_level=None, timeout=1)) as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                db.execute("PRAGMA journal_mode = DELETE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"{path} is in use ({exc}): stop the server first") from None

    def reclaim_space(self, convert: bool) -> bool:
        """Give the pages freed by pruning or forgetting back to the file system, in short incremental-vacuum
        steps; an older database first needs one full VACUUM (blocking writers) to switch: only if `convert`."""
        with self._writer() as db:
            if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # 2: INCREMENTAL
                if not convert:
                    return False
                db.execute("PRAGMA auto_vacuum = INCREMENTAL")
                db.execute("VACUUM")
        with self._store_errors():
            while self.connect().execute("PRAGMA freelist_count").fetchone()[0]:
                with self._writing() as db:
                    db.execute(f"PRAGMA incremental_vacuum({VACUUM_PAGES_PER_STEP})").fetchall()
        self.truncate_wal()
        return True

    def erase_freed_bytes(self) -> None:
        """Rewrite the whole file (VACUUM, blocking writers) and empty the write-ahead log, so no deleted or
        overwritten value is left; a StoreError when a reader kept the log (old values may still stand in it)."""
        with self._writer() as db:
            db.execute("VACUUM")
        if not self.truncate_wal():
            raise StoreError(f"the tables are rewritten, but another connection kept {self.path}-wal, which may"
                             " still hold old values: run the command again (repeating it is safe)", "locked")

    def truncate_wal(self) -> bool:
        """Copy the write-ahead log into the database and truncate it; False if readers kept it."""
        with self._store_errors():
            busy = self.connect().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        return not busy


# Maintenance: backup, restore, retention, forgetting a player #################
# What the backup, restore, prune and forget commands (and the server's daily prune) do;
# the SQL and the SQLite-only file work are Store methods.

PRUNE_BATCH_ROWS = 1000      # rows deleted per transaction: each holds the write lock ~10 ms
PRUNE_PAUSE_SECONDS = 0.01   # between batches, so waiting ingest writers get the lock first
PRUNE_EVERY_SECONDS = 24 * 3600


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _move_into_place(partial: str, dest: str) -> None:
    """Put the file `partial`, written beside `dest`, on disk and then in place: `dest` is never half-written."""
    with open(partial, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(partial, dest)


def write_backup(store: Store, dest: str, force: bool = False) -> dict[str, Any]:
    """Copy the live database to `dest` (a file, or a folder to put a dated file in), check the copy and
    return what was written."""
    if os.path.isdir(dest):
        dest = os.path.join(dest, f"referrals-{_utc_stamp()}.db")
    if os.path.exists(dest) and not force:
        raise ConfigError(f"{dest} exists: pass --force to replace it, or name a new file")
    partial = f"{dest}.partial-{os.getpid()}"
    started = time.monotonic()
    try:
        store.backup_to(partial)
        rows = SQLiteStore.check_copy(partial)
        _move_into_place(partial, dest)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return {"path": os.path.abspath(dest), "bytes": os.path.getsize(dest),
            "seconds": round(time.monotonic() - started, 3), "integrity": "ok", "rows": rows}


def restore_database(source: str, db_path: str) -> dict[str, Any]:
    """Put a backup in place of `db_path` (the server must be stopped); the current file is kept
    beside it as `<db>.before-restore-<time>`. Returns what was restored and what was kept."""
    if is_database_url(db_path):
        raise ConfigError("restore puts a SQLite backup in place; restore a PostgreSQL database with pg_restore,"
                          " or move a SQLite backup into PostgreSQL with copy-db")
    rows = SQLiteStore.check_copy(source)
    kept = None
    if os.path.exists(db_path):
        SQLiteStore.take_offline(db_path)  # refuses while a server has it open; folds its -wal in
        kept = f"{db_path}.before-restore-{_utc_stamp()}"
        os.replace(db_path, kept)
    for stale in (db_path + "-wal", db_path + "-shm"):
        if os.path.exists(stale):
            os.remove(stale)
    partial = f"{db_path}.partial-{os.getpid()}"
    _create_private_file(partial)
    with open(source, "rb") as src, open(partial, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    _move_into_place(partial, db_path)
    return {"path": os.path.abspath(db_path), "restored_from": os.path.abspath(source), "previous": kept,
            "rows": rows}


def prune(store: Store, older_than: int, *, convert: bool = True) -> dict[str, Any]:
    """Delete delivery-log and rejected-request rows older than `older_than` seconds, a batch per
    short transaction, then reclaim the space. Referrals, anchors and counters are untouched."""
    started, size_before = time.monotonic(), store.database_bytes()
    before = now() - older_than
    deleted = {}
    for table in PRUNED_TABLES:
        deleted[table] = 0
        while batch := store.prune_batch(table, before, PRUNE_BATCH_ROWS):
            deleted[table] += batch
            time.sleep(PRUNE_PAUSE_SECONDS)
    reclaimed = store.reclaim_space(convert) if any(deleted.values()) else True
    return {"deleted": deleted, "older_than_seconds": older_than, "space_reclaimed": reclaimed,
            "bytes_before": size_before, "bytes_after": store.database_bytes(),
            "seconds": round(time.monotonic() - started, 3)}


def start_auto_prune(store: Store, older_than: int) -> threading.Thread:
    """Prune at start-up and then once a day, in a daemon thread of the serving process."""
    def run() -> None:
        while True:
            try:
                result = prune(store, older_than, convert=False)
                log.info("pruned rows older than %s s: %s", older_than, result["deleted"])
                if not result["space_reclaimed"]:
                    log.warning(f"run `{COMMAND} prune` once, server stopped or not, to let the"
                                " database file shrink (it was made by an older mmoref)")
            except StoreError:
                log.exception("automatic prune failed; it runs again in a day")
            time.sleep(PRUNE_EVERY_SECONDS)

    thread = threading.Thread(target=run, name="mmoref-prune", daemon=True)
    thread.start()
    return thread


def identity_spellings(identity: str) -> list[str]:
    """The ways an identity can appear in a stored JSON body: as is, and JSON-escaped."""
    escaped = {json.dumps(identity)[1:-1], json.dumps(identity, ensure_ascii=False)[1:-1]}
    return sorted({identity} | escaped, key=len, reverse=True)


class NothingToForget(ConfigError):
    """`forget` found the identity nowhere: nothing was changed, nothing rewritten; `answer` is what `--json` prints."""

    def __init__(self, message: str, answer: dict[str, Any]):
        super().__init__(message)
        self.answer = answer


_FORGOTTEN_FORM = re.compile(r"forgotten:[0-9a-f]{32}")   # what forgotten_form returns


def forget(store: Store, server_id: str, identity: str) -> dict[str, Any]:
    """Erase a referee identity everywhere it is stored, keeping its forgotten form so first touch still holds;
    then rewrite the database files so the raw bytes are gone too. NothingToForget when the identity is stored
    nowhere and was never forgotten (a typo): then nothing is rewritten either."""
    if store.server(server_id) is None:
        raise ConfigError(f"unknown server {server_id!r}")
    identity = identity.strip()
    if not identity:
        raise ConfigError("--identity is empty: give the referee_identity to forget")
    if _FORGOTTEN_FORM.fullmatch(identity):
        raise ConfigError(f"{identity} is a forgotten form already: give the identity as the game server sent it")
    forgotten = forgotten_form(store.identity_key, server_id, identity)
    changed, kept, before = store.forget_identity(server_id, identity, forgotten, identity_spellings(identity))
    result: dict[str, Any] = {"server_id": server_id, "forgotten_as": forgotten, "rows_changed": changed}
    if kept:  # the idempotency key of those events: replacing it would make a retry a new event (ids listed)
        result["server_event_id_kept"] = kept
    if not any(changed.values()):
        if not before and not kept:
            raise NothingToForget(f"nothing on {server_id} matches {identity!r}: nothing was changed (identities are"
                                  " compared exactly, after trimming: check the spelling and the server)",
                                  {**result, "nothing_matched": True})
        if before:  # rewrite again all the same, in case that run stopped before its rewrite was done
            result["forgotten_before"] = True
    store.erase_freed_bytes()
    return result


# Dashboard views (docs/contract.md §4, §6) ###################################
# Server-rendered pages under /dashboard: login, servers, the Referrals tab with
# secrets, "Send test event", delivery log, rejected requests and analytics. They use
# the same store and the same ingest pipeline as the HTTP route; templates autoescape.

dashboard = Blueprint("dashboard", __name__, url_prefix="/dashboard")
LOG_PAGE_SIZE = 50
MAX_ROW_ID = 2**63 - 1           # SQLite's largest integer: no log row has a larger id
LOGIN_FREE_FAILURES = 5          # then each failure doubles the wait, up to LOGIN_MAX_WAIT
LOGIN_MAX_WAIT = 300
LOGIN_CLIENTS_KEPT = 10_000      # clients with failures on record; beyond, the lightest record is forgotten
LOGIN_BUDGET = 100               # login attempts per LOGIN_BUDGET_WINDOW from all clients together,
LOGIN_BUDGET_WINDOW = 600        # beyond which every login waits for the next window (but see _login_counters)
LOGIN_DEVICE_COOKIE = "mmoref_device"   # a browser that logged in before: its own slowdown and budget
LOGIN_DEVICE_LIFETIME = 180 * 86400     # from its last login; a password change ends every one
GRACE_CHOICES = {"0": "revoke now", "3600": "1 hour", "86400": "24 hours", "604800": "7 days"}
OUTCOMES = ("advanced", "no_op", "first_touch_conflict", "owner_action")
LOG_EVENTS = EVENTS + ("rejected",)  # owner rejections are logged as their own event
CHART_KINDS = ("clicked", "registered", "qualified")
# The dashboard's keys in the session, all under one prefix. Embedded in a host app the session is
# the host's: mmoref reads and removes only these (never session.clear()), has its own flashed
# messages, and a host's session.clear() just logs the owner out of the dashboard.
SESSION_KEY_PREFIX = "mmoref_"
FLASHES = "mmoref_flashes"


def _is_logged_in() -> bool:
    """The session cookie names a session the database still has, opened under today's password."""
    if "mmoref_logged_in" not in g:
        tag, session_id = _password_tag(), session.get("mmoref_session")
        stored = None
        if tag is not None and isinstance(session_id, str):  # tag None: no password yet, nobody is logged in
            lifetime = int(current_app.permanent_session_lifetime.total_seconds())
            stored = get_store().session_password_tag(session_id, not_before=now() - lifetime)
        g.mmoref_logged_in = stored is not None and hmac.compare_digest(stored, tag or "")
    return g.mmoref_logged_in


def _password_tag() -> str | None:
    """An HMAC of the password (as configured, or its stored hash) under a key kept in the database: it never
    leaves the server (the cookie holds a random session id), and a new password logs every session out."""
    configured = current_app.config.get("MMOREF_ADMIN_PASSWORD")
    basis = f"env:{configured}" if configured else get_store().admin_password_hash()
    if not basis:
        return None
    key = get_store().installation_key("session_binding_key")
    return hmac.new(key.encode(), basis.encode(), hashlib.sha256).hexdigest()


def csrf_token() -> str:
    if "mmoref_csrf" not in session:
        session["mmoref_csrf"] = secrets.token_urlsafe(32)
    return session["mmoref_csrf"]


def _end_dashboard_session() -> None:
    """Forget the dashboard's keys in the session (login, CSRF token, results, messages); the rest is a host's."""
    for key in [key for key in session if key.startswith(SESSION_KEY_PREFIX)]:
        session.pop(key)


def _flash(message: str) -> None:
    """A message for the next dashboard page, in the dashboard's own list (not Flask's, which a host app reads)."""
    session[FLASHES] = [*session.get(FLASHES, []), message]


@dashboard.before_request
def _guard() -> Any:
    """Every POST carries the session's CSRF token; every page but login needs a login."""
    g.mmoref_started = time.perf_counter()
    if request.method == "POST":
        sent = request.form.get("csrf_token", "")
        if not hmac.compare_digest(sent.encode(), session.get("mmoref_csrf", "").encode()) or not sent:
            return _page("message.html", 400, title="Form expired",
                         message="This form's security token is missing or out of date: go back and reload the page.")
    if request.endpoint != "mmoref.dashboard.login" and not _is_logged_in():
        here = request.full_path if request.query_string else request.path
        return redirect(url_for("mmoref.dashboard.login", next=request.script_root + here))
    return None


@dashboard.after_request
def _no_store(response: Any) -> Any:
    """Pages can show a secret once: never cached, never framed, no other origin's content."""
    headers = response.headers
    headers["Cache-Control"] = "no-store"
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    # the one <style> element carries this request's nonce; no scripts at all
    style = f"'nonce-{g.mmoref_style_nonce}'" if "mmoref_style_nonce" in g else "'none'"
    headers.setdefault("Content-Security-Policy", f"default-src 'none'; style-src {style}; img-src 'self';"
                                                  " form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    started = g.get("mmoref_started")
    if started is not None:  # server time, for the benchmark and the browser's dev tools
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
    return response


def reserve_login_attempt(store: Store, client: str, at: int, budget: str = "*") -> int:
    """Count a login attempt as failed before its password is checked (so parallel guesses, in any worker, see
    each other); return the seconds to wait instead, 0 to go ahead. After LOGIN_FREE_FAILURES a client waits
    1, 2, 4 ... LOGIN_MAX_WAIT s; beyond LOGIN_BUDGET attempts a window against one `budget` ("*": the one all
    strangers share), everyone counted against it waits."""
    with store.transaction() as transaction:
        failures, last_at = transaction.login_failures(client)
        wait = 0
        if failures >= LOGIN_FREE_FAILURES:
            wait = max(0, last_at + min(2 ** (failures - LOGIN_FREE_FAILURES), LOGIN_MAX_WAIT) - at)
        if transaction.hits("login", budget, at, LOGIN_BUDGET_WINDOW) >= LOGIN_BUDGET:
            wait = max(wait, LOGIN_BUDGET_WINDOW - at % LOGIN_BUDGET_WINDOW)
        if not wait:
            transaction.add_login_failure(client, at, keep=LOGIN_CLIENTS_KEPT)
            transaction.hit("login", budget, at, LOGIN_BUDGET_WINDOW)
        return wait


def _login_counters(store: Store, device: str | None) -> tuple[str, str]:
    """(The client whose failures slow a login down, the budget it spends): a browser that logged in before is
    a client with a budget of its own, a loopback address has its own budget, every other client spends the
    shared one. So strangers lock out neither the owner's browser nor the machine itself."""
    if device is not None:
        return f"device:{device}", f"device:{device}"
    address = request.remote_addr or ""
    return client_key(store, address), "loopback" if _is_loopback(address) else "*"


def _device_serializer() -> URLSafeTimedSerializer | None:
    """Signs device cookies under the password tag: a new password makes every one worthless."""
    tag = _password_tag()
    return URLSafeTimedSerializer(tag, salt="mmoref.login-device") if tag else None


def _known_device() -> str | None:
    """The id in this request's device cookie when it is valid (signed here, under today's password, recently)."""
    cookie, serializer = request.cookies.get(LOGIN_DEVICE_COOKIE), _device_serializer()
    if not cookie or serializer is None:
        return None
    try:
        device = serializer.loads(cookie, max_age=LOGIN_DEVICE_LIFETIME)
    except BadData:
        return None
    return device if isinstance(device, str) else None


def _remember_device(response: Any, device: str | None) -> None:
    """Give a browser that just logged in its device cookie (its old id, or a new one), sent to the login page only."""
    serializer = _device_serializer()
    if serializer is not None:
        response.set_cookie(LOGIN_DEVICE_COOKIE, serializer.dumps(device or secrets.token_urlsafe(16)),
                            max_age=LOGIN_DEVICE_LIFETIME, path=url_for("mmoref.dashboard.login"),
                            secure=request.is_secure, httponly=True, samesite="Lax")


def check_password(password: str) -> bool:
    """Constant-time check against MMOREF_ADMIN_PASSWORD or the stored hash."""
    configured = current_app.config.get("MMOREF_ADMIN_PASSWORD")
    if configured:
        return hmac.compare_digest(password.encode(), configured.encode())
    stored = get_store().admin_password_hash()
    return stored is not None and check_password_hash(stored, password)


@dashboard.route("/login", methods=["GET", "POST"])
def login() -> Any:
    store = get_store()
    error, status = None, 200
    if request.method == "POST":
        device = _known_device()
        client, budget = _login_counters(store, device)
        wait = reserve_login_attempt(store, client, now(), budget)
        if wait:
            error, status = f"Too many failed logins: wait {wait} s and try again.", 429
        elif check_password(request.form.get("password", "")):
            store.forget_login_failures(client)
            _end_dashboard_session()  # a new session id and CSRF token: none chosen before the login survives it
            lifetime = int(current_app.permanent_session_lifetime.total_seconds())
            session["mmoref_session"] = store.open_session(_password_tag() or "", now(), lifetime)
            home = url_for("mmoref.dashboard.index")
            response = redirect(_local_target(request.args.get("next", ""), home) or home)
            _remember_device(response, device)
            return response
        else:
            store.login_failed_at(client, now())  # the wait runs from the answer, not from the reservation
            error, status = "Wrong password.", 401
    return _page("login.html", status, title="Log in", error=error, wrong_password=status == 401,
                 no_password=_password_tag() is None, command=COMMAND,
                 set_password_command=set_password_command_line(current_app.config["MMOREF_DB"]))  # names this db


def _local_target(target: str, within: str) -> str | None:
    """`target` when it is a path under `within` safe to redirect to (no other host, no control
    characters), else None: `next` and `back` come from the request."""
    if target.startswith(within) and "//" not in target and "\\" not in target and target.isprintable():
        return target
    return None


@dashboard.post("/logout")
def logout() -> Any:
    session_id = session.get("mmoref_session")
    if isinstance(session_id, str):
        get_store().close_session(session_id)
    _end_dashboard_session()
    return redirect(url_for("mmoref.dashboard.login"))


@dashboard.post("/servers")
def add_server_form() -> Any:
    server_id, game, name, url = (request.form.get(field, "").strip()
                                  for field in ("server_id", "game", "name", "registration_url"))
    try:
        _, kid = get_store().add_server(server_id, game, name, url, request.form.get("identity_field", "username"))
    except ConfigError as exc:
        return index(error=str(exc), status=400)
    session[SHOWN_ONCE] = {"page": SERVERS_PAGE, "new_secret": {"server_id": server_id, "game": game, "kid": kid,
                                                                "no_registration_url": not url}}
    return redirect(url_for("mmoref.dashboard.index"))


@dashboard.get("/")
def index(status: int = 200, **extra: Any) -> Any:
    """The servers page; add_server_form shows it again with its error (in `extra`)."""
    store = get_store()
    return _page("index.html", status, title="Servers", servers=store.servers(), funnels=store.funnels(),
                 rejected=[_rejected_view(row) for row in store.rejected_requests(None, 20)],
                 identity_fields=IDENTITY_FIELDS, form=request.form if extra.get("error") else {},
                 **_shown_once(SERVERS_PAGE), **extra)  # refill the form only to fix it


# Post/redirect/get: a form's result (a new secret, a test token, a test event's answer) waits in
# the session for the one page the redirect leads to. A new secret waits as its kid only, and
# Store.reveal_secret gives its value once, however many pages ask.
SHOWN_ONCE = "mmoref_shown_once"
SERVERS_PAGE = ""  # the servers list's key; a server's Referrals tab is keyed by its server id


def _shown_once(page: str) -> dict[str, Any]:
    """The results waiting for `page`, taken out of the session; a new secret with its value, if still unseen."""
    waiting = session.get(SHOWN_ONCE)
    if not waiting or waiting.get("page") != page:
        return {}
    results = {name: value for name, value in session.pop(SHOWN_ONCE).items() if name != "page"}
    new_secret = results.pop("new_secret", None)
    if new_secret:
        secret = get_store().reveal_secret(new_secret.get("server_id") or page, new_secret["kid"])
        if secret is not None:
            results["new_secret"] = {**new_secret, "secret": secret}
    return results


def _rejected_view(row: Row) -> dict[str, Any]:
    """A rejected request for display: its hint without the diagnosis, which is shown on its own line."""
    hint, diagnosis = row["hint"] or "", row["diagnosis"]
    return {**dict(row), "hint": hint.removesuffix(f" ({diagnosis})") if diagnosis else hint}


def _server_or_404(game: str, server_id: str) -> Row:
    server = get_store().server(server_id)
    if server is None or server["game"] != game:
        abort(404)
    return server


def _server_url(endpoint: str, server: Row, **params: Any) -> str:
    """The URL of one of a server's dashboard pages (`server`: a Row, or a dict with its game and server id)."""
    return url_for(f"mmoref.dashboard.{endpoint}", game=server["game"], server_id=server["server_id"], **params)


def _tab_url(server: Row, **params: Any) -> str:
    return _server_url("referrals_tab", server, **params)


def _to_tab(server: Row, *messages: str, anchor: str = "", **results: dict[str, Any]) -> Any:
    """Redirect to the server's Referrals tab (at `anchor`, where a result shows), with messages and results."""
    for message in messages:
        _flash(message)
    if results:
        session[SHOWN_ONCE] = {"page": server["server_id"], **results}
    return redirect(_tab_url(server) + (f"#{anchor}" if anchor else ""))


def _row_id(text: str) -> int:
    """A delivery-log id from the query string; ValueError (so: ignored) when no row could have it."""
    value = int(text)
    if not 0 < value <= MAX_ROW_ID:
        raise ValueError(f"row id {text!r} out of range")
    return value


@dashboard.get("/<game>/<server_id>/referrals")
def referrals_tab(game: str, server_id: str) -> Any:
    """The Referrals tab, with whatever result a form left for it (a new secret, token or test answer)."""
    server, store, filters = _server_or_404(game, server_id), get_store(), _log_filters()
    before, after = request.args.get("before", type=_row_id), request.args.get("after", type=_row_id)
    rows = store.delivery_log(server_id, limit=LOG_PAGE_SIZE + 1, before_id=before, after_id=after, **filters)
    has_more = len(rows) > LOG_PAGE_SIZE
    rows = rows[:LOG_PAGE_SIZE] if after is None else rows[-LOG_PAGE_SIZE:]
    older = rows and (has_more or after is not None)
    newer = rows and (before is not None or (after is not None and has_more))
    live = store.live_secrets(server_id, now())
    secret_rows = store.secret_summaries(server_id)
    return _page("referrals.html", 200, title=f"Referrals · {server['name'] or server_id}", server=server,
                 secrets=secret_rows, has_secret=bool(live), now=now(), rotation_nonce=secrets.token_urlsafe(16),
                 in_grace=[row for row in secret_rows if row["expires_at"] and row["expires_at"] > now()],
                 connect=_connect_box(server_id, live[0][0] if live else None),
                 log_rows=[_log_view(row) for row in rows], filters=filters,
                 older_url=_tab_url(server, before=rows[-1]["id"], **filters) if older else None,
                 newer_url=_tab_url(server, after=rows[0]["id"], **filters) if newer else None,
                 csv_url=_server_url("log_csv", server, **filters),
                 rejected=[_rejected_view(row) for row in store.rejected_requests(server_id, 20)],
                 analytics=analytics(store, server_id),
                 share_link=url_for("mmoref.share_link", server_id=server_id, _external=True) + "?ref=",
                 grace_choices=GRACE_CHOICES, identity_fields=IDENTITY_FIELDS, log_events=LOG_EVENTS,
                 outcomes=OUTCOMES, **_shown_once(server_id))


def _connect_box(server_id: str, kid: str | None) -> dict[str, str]:
    """What a kit needs, as this request reached the server (prefix included): never the secret."""
    url = url_for("mmoref.ingest", _external=True)
    body = json.dumps({"event": "registered", "token": "TOKEN_FROM_THE_SHARE_LINK", "server_id": server_id,
                       "server_event_id": "reg-1", "referee_identity": "player-1"}, separators=(",", ":"))
    kid_part = f",kid={kid}" if kid else ""
    shell = (f"SECRET='paste the signing secret here'\n"
             f"BODY='{body}'\n"
             "T=$(date +%s)\n"
             "MAC=$(printf '%s.%s' \"$T\" \"$BODY\" | openssl dgst -sha256 -hmac \"$SECRET\" | sed 's/^.* //')\n"
             f"curl -sS -X POST '{url}' -H 'Content-Type: application/json' \\\n"
             f"  -H \"{SIGNATURE_HEADER}: t=$T,v1=sha256=$MAC{kid_part}\" --data-binary \"$BODY\"")
    python = (f"{COMMAND} send registered --endpoint '{url}' \\\n"
              f"  --server-id {server_id} --secret \"$SECRET\"{f' --kid {kid}' if kid else ''} \\\n"
              "  --token TOKEN_FROM_THE_SHARE_LINK --referee-identity player-1")
    return {"url": url, "server_id": server_id, "kid": kid or "", "shell": shell, "python": python}


class LogFilters(TypedDict, total=False):
    """The delivery-log filters of a dashboard request (Store.delivery_log's), each only when set."""
    event: str
    outcome: str
    q: str


def _log_filters() -> LogFilters:
    """The delivery-log filters of this request that are valid, for queries and links."""
    args, filters = request.args, LogFilters()
    if args.get("event") in LOG_EVENTS:
        filters["event"] = args["event"]
    if args.get("outcome") in OUTCOMES:
        filters["outcome"] = args["outcome"]
    q = args.get("q", "").strip()[:MAX_FIELD_CHARS]
    if q:
        filters["q"] = q
    return filters


def _log_view(row: Row) -> dict[str, Any]:
    """A delivery-log row for display: PII-light."""
    try:
        payload = json.loads(row["payload"] or "{}")
    except ValueError:
        payload = {}
    referee = payload.get("referee_identity") if isinstance(payload, dict) else None
    return {**dict(row), "received": iso_utc(row["received_at"]),
            "referee_masked": mask(referee if isinstance(referee, str) else row["referee_identity"], 2, 2),
            "token_masked": payload.get("token", "") if isinstance(payload, dict) else ""}


@dashboard.post("/<game>/<server_id>/referrals/enabled")
def set_enabled(game: str, server_id: str) -> Any:
    server, store = _server_or_404(game, server_id), get_store()
    enable = request.form.get("enabled") == "1"
    store.update_server(server_id, referrals_enabled=int(enable))
    if enable and not store.live_secrets(server_id, now()):  # enabling mints the first secret
        _, kid = store.rotate_secret(server_id, grace=0)
        return _to_tab(server, new_secret={"kid": kid})
    return _to_tab(server, "Referrals enabled." if enable else
                   "Referrals disabled: events now get 404 referrals not enabled.")


@dashboard.post("/<game>/<server_id>/referrals/secret")
def rotate_secret_form(game: str, server_id: str) -> Any:
    server = _server_or_404(game, server_id)
    grace = request.form.get("grace", str(DEFAULT_GRACE_SECONDS))
    if grace not in GRACE_CHOICES:
        abort(400)
    nonce = request.form.get("rotation", "")[:64] or secrets.token_urlsafe(16)  # a form without one rotates
    kid, rotated = get_store().rotate_secret_once(server_id, int(grace), nonce)
    if not rotated:
        _flash(f"This form was already sent: it made secret {kid}. Nothing was rotated again.")
    return _to_tab(server, new_secret={"kid": kid, "previous": _rotated_out(server_id, kid)})


def _rotated_out(server_id: str, kid: str) -> dict[str, Any] | None:
    """What the rotation that made `kid` did to the secret current before it, as stored (a form sent
    twice shows what its first sending chose): its grace and end, or revoked (`until` None)."""
    rows = get_store().secret_summaries(server_id)  # newest first
    made = next((index for index, row in enumerate(rows) if row["kid"] == kid), len(rows))
    if made + 1 >= len(rows) or rows[made + 1]["expires_at"] is None:
        return None
    rotated_at, ends = rows[made]["created_at"], rows[made + 1]["expires_at"]
    if ends <= rotated_at:
        return {"until": None}
    grace = str(ends - rotated_at)
    return {"until": iso_utc(ends), "grace": GRACE_CHOICES.get(grace, f"{grace} seconds")}


@dashboard.post("/<game>/<server_id>/referrals/settings")
def settings_form(game: str, server_id: str) -> Any:
    server = _server_or_404(game, server_id)
    url = request.form.get("registration_url", "").strip()
    identity_field = request.form.get("identity_field", "")
    try:
        if identity_field not in IDENTITY_FIELDS:
            raise ConfigError(f"identity field must be one of {', '.join(IDENTITY_FIELDS)}")
        get_store().update_server(server_id, registration_url=check_registration_url(url) if url else None,
                                  identity_field=identity_field)
    except ConfigError as exc:
        return _to_tab(server, str(exc))
    return _to_tab(server, "Settings saved.")


@dashboard.post("/<game>/<server_id>/referrals/token")
def mint_token_form(game: str, server_id: str) -> Any:
    server = _server_or_404(game, server_id)
    try:
        token, referral_id = get_store().mint_referral(server_id, request.form.get("ref", "").strip(), test=True)
    except ConfigError as exc:
        return _to_tab(server, str(exc))
    return _to_tab(server, new_token={"token": token, "referral_id": referral_id})


@dashboard.post("/<game>/<server_id>/referrals/test-event")
def send_test_event(game: str, server_id: str) -> Any:
    """Sign a test `registered` with the current secret, as the kit does, and run it through the ingest pipeline."""
    server, store = _server_or_404(game, server_id), get_store()
    live = store.live_secrets(server_id, now())
    if not live:
        return _to_tab(server, "Generate a secret first: the test event is signed with it.")
    kid, secret = live[0]
    body = build_body("registered", "dashboard-test-token", server_id, f"test-{secrets.token_hex(4)}",
                      referee_identity="dashboard-test-player", test=True)
    config = current_app.config
    status, answer = handle_ingest(store, body, signature_header(secret, body, kid=kid),
                                   window=config["MMOREF_REPLAY_WINDOW"], ttl=config["MMOREF_TOKEN_TTL"])
    return _to_tab(server, anchor="test-result", test_result={"status": status, "body": json.dumps(answer, indent=2)})


@dashboard.get("/<game>/<server_id>/referrals/log.csv")
def log_csv(game: str, server_id: str) -> Any:
    """The filtered delivery log as CSV, streamed in keyset-paged chunks."""
    _server_or_404(game, server_id)
    store, filters = get_store(), _log_filters()
    columns = ("id", "received_at", "event", "outcome", "state", "referral_id", "referrer_code", "referee_identity",
               "server_event_id")

    def lines() -> Iterator[str]:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        before = None
        while True:
            rows = store.delivery_log(server_id, limit=1000, before_id=before, **filters)
            for row in rows:
                writer.writerow([_csv_cell(iso_utc(row[name]) if name == "received_at" else row[name])
                                 for name in columns])
            yield out.getvalue()
            out.seek(0)
            out.truncate()
            if len(rows) < 1000:
                return
            before = rows[-1]["id"]

    return current_app.response_class(stream_with_context(lines()), mimetype="text/csv", headers={
        "Content-Disposition": f'attachment; filename="delivery-log-{server_id}.csv"'})


def _csv_cell(value: Any) -> Any:
    """Neutralise spreadsheet formulas (identities and codes come from players) with a leading `'`."""
    return _FORMULA_START.sub(r"'\1", value) if isinstance(value, str) else value


# A formula starts a cell or follows a separator: a spreadsheet may split on `;`, a tab, `|` or a space as well
# as on `,` (`x;=1+1`); it reads the fullwidth ＝ ＋ － ＠ (U+FF1D, U+FF0B, U+FF0D, U+FF20) like = + - @
_FORMULA_START = re.compile(r"(?<![^,;|\s\"'])([=+\-@\t\r\uff1d\uff0b\uff0d\uff20])")


@dashboard.get(f"/<game>/<server_id>/referrals/log/<int(max={MAX_ROW_ID}):row_id>")
def log_detail(game: str, server_id: str, row_id: int) -> Any:
    server, store = _server_or_404(game, server_id), get_store()
    row = store.delivery_log_row(server_id, row_id)
    referral = store.referral(row["referral_id"]) if row is not None else None
    if row is None or referral is None:
        abort(404)
    try:
        payload = json.dumps(json.loads(row["payload"]), indent=2, ensure_ascii=False) if row["payload"] else None
    except ValueError:
        payload = row["payload"]
    actions = [action for action, (allowed, _) in OWNER_ACTIONS.items() if referral["state"] in allowed]
    return _page("detail.html", 200, title=f"Event {row_id}", server=server, row=_log_view(row), payload=payload,
                 referral=referral, history=[_log_view(r) for r in store.referral_history(row["referral_id"])],
                 actions=actions)


@dashboard.route("/<game>/<server_id>/referrals/referral/<referral_id>/<action>", methods=["GET", "POST"])
def owner_action_form(game: str, server_id: str, referral_id: str, action: str) -> Any:
    """Reverse or reject: final, so a page asks first (GET) and only its confirmed form acts (POST)."""
    server = _server_or_404(game, server_id)
    referral = get_store().referral(referral_id)
    if action not in OWNER_ACTIONS or referral is None or referral["server_id"] != server_id:
        abort(404)
    source = request.form if request.method == "POST" else request.args
    back = _local_target(source.get("back", ""), _tab_url(server)) or _tab_url(server)
    if request.method == "GET" or source.get("confirmed") != "yes":
        return _page("confirm.html", 200, title=f"{action.capitalize()} referral {referral_id}?", server=server,
                     referral=referral, action=action, next_state=OWNER_ACTIONS[action][1], back=back)
    try:
        _flash(f"Referral {referral_id} is now {owner_action(get_store(), referral_id, action)}.")
    except ConfigError as exc:
        _flash(str(exc))
    return redirect(back)


@dashboard.post("/<game>/<server_id>/referrals/forget/<referral_id>")
def forget_form(game: str, server_id: str, referral_id: str) -> Any:
    """Forget the referral's player: a confirm page first, then `forget` (as the CLI does)."""
    server, store = _server_or_404(game, server_id), get_store()
    referral = store.referral(referral_id)
    if referral is None or referral["server_id"] != server_id or not referral["referee_identity"]:
        abort(404)
    if request.form.get("confirm") != "yes":
        return _page("forget.html", 200, title="Forget a player", server=server, referral=referral)
    try:
        result = forget(store, server_id, referral["referee_identity"])
    except ConfigError as exc:   # a referral whose player is forgotten already
        return _to_tab(server, str(exc))
    kept = [kept_event_ids_line(result["server_event_id_kept"])] if "server_event_id_kept" in result else []
    return _to_tab(server, f"The player of referral {referral_id} is forgotten.", *kept)


def analytics(store: Store, server_id: str, days: int = 30) -> dict[str, Any]:
    """Funnel, leaderboard and daily series from the counter tables (no row scans)."""
    funnel = store.funnel(server_id)
    first = datetime.datetime.fromtimestamp(now(), datetime.timezone.utc).date() - datetime.timedelta(days=days - 1)
    counted = store.daily_counts(server_id, first.isoformat())
    series = []
    for offset in range(days):
        day = (first + datetime.timedelta(days=offset)).isoformat()
        row = counted.get(day)
        series.append({"day": day, **{kind: row[kind] if row else 0 for kind in CHART_KINDS}})
    return {"funnel": funnel, "leaders": store.leaders(server_id), "series": series,
            "registered_rate": _rate(funnel["registered"], funnel["clicked"]),
            "qualified_rate": _rate(funnel["qualified"], funnel["registered"]), "chart": _chart(series)}


def _rate(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


def _chart(series: list[dict[str, Any]]) -> dict[str, Any]:
    """Bar geometry for the inline SVG: one group of three bars a day; peak 0 when there is nothing to draw.
    `axis` dates the first, middle and last day under it."""
    peak = max([0] + [day[kind] for day in series for kind in CHART_KINDS])
    bars = []
    for index, day in enumerate(series):
        for offset, kind in enumerate(CHART_KINDS):
            height = round(100 * day[kind] / peak, 1) if peak else 0
            bars.append({"x": index * 20 + offset * 6, "y": 110 - height, "height": height, "kind": kind,
                         "label": f"{day['day']}: {day[kind]} {kind}"})
    axis = [series[0]["day"], series[len(series) // 2]["day"], series[-1]["day"]] if series else []
    return {"bars": bars, "peak": peak, "width": len(series) * 20, "axis": axis}


def _page(template: str, status: int, **context: Any) -> Any:
    g.mmoref_style_nonce = secrets.token_urlsafe(16)  # the Content-Security-Policy allows this style sheet only
    html = TEMPLATES.get_template(template).render(logged_in=_is_logged_in(), messages=session.pop(FLASHES, []),
                                                   style_nonce=g.mmoref_style_nonce, **context)
    return current_app.response_class(html, status=status, mimetype="text/html")


blueprint.register_blueprint(dashboard)


# App factory #################################################################


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """The standalone server: settings from MMOREF_* env, then `config`, then the blueprint."""
    app = Flask(__name__)
    app.config.update(load_settings())
    app.config.update(SESSION_COOKIE_NAME=SESSION_COOKIE, SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_HTTPONLY=True)
    app.config.update(config or {})
    proxies = app.config["MMOREF_TRUSTED_PROXY"]
    # wrapping wsgi_app is Flask's documented way to add middleware; mypy objects to replacing a method
    app.wsgi_app = _ForwardedByTrustedProxy(app.wsgi_app, proxies)  # type: ignore[method-assign]
    app.session_interface = _SessionInterface()
    app.register_blueprint(blueprint)
    app.add_url_rule("/", "home", _home)
    _log_through_gunicorn(app.config["MMOREF_LOG_FORMAT"])
    context = click.get_current_context(silent=True)
    # the `flask` command loads the app for each command it runs: `flask --app mmoref_server log` opens only its --db
    if context is None or context.find_object(ScriptInfo) is None:
        _open_database(app)
    app.cli = _FlaskFindsOurCommands(app.name)
    return app


def _open_database(app: Flask) -> None:
    """Create or migrate the schema now, so a newer database is refused at start-up, and give the app its
    per-installation SECRET_KEY (never a constant)."""
    with app.app_context():
        store = get_store()
        if not app.config.get("SECRET_KEY"):
            app.config["SECRET_KEY"] = store.installation_key("session_key")


class _FlaskFindsOurCommands(AppGroup):
    """`flask --app mmoref_server COMMAND` finds every command `python mmoref_server.py COMMAND` finds."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or cli.get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *cli.list_commands(ctx)})


def _home() -> Any:
    """The standalone server's `/`: its dashboard (an app embedding the blueprint keeps its own `/`)."""
    return redirect(url_for("mmoref.dashboard.index"))


def _log_through_gunicorn(log_format: str) -> None:
    """Under gunicorn, our log lines go to its error log at its --log-level (all of it JSON lines with
    MMOREF_LOG_FORMAT=json): gunicorn configures only its own loggers, so ours would vanish."""
    gunicorn_log = logging.getLogger("gunicorn.error")
    if gunicorn_log.handlers and not log.handlers:
        if log_format == "json":
            for handler in gunicorn_log.handlers:
                handler.setFormatter(JsonLines())
        log.handlers[:] = gunicorn_log.handlers
        log.setLevel(gunicorn_log.level)
        log.propagate = False


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and the ingest line's fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        utc = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry = {"time": f"{utc}.{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
                 "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _ForwardedByTrustedProxy:
    """The one place X-Forwarded-* headers are read: only from a trusted proxy, only its hop (`spoofed, real`: `real`);
    gunicorn applies X-Forwarded-Proto itself (for its forwarded_allow_ips), so the scheme is reset first."""

    def __init__(self, wsgi_app: Callable, trusted_proxies: Sequence[str] | str):
        self.direct = wsgi_app
        self.proxied = ProxyFix(wsgi_app, x_for=1, x_proto=1, x_host=1, x_port=1, x_prefix=1)
        self.trusted_proxies = _ip_addresses(trusted_proxies) if isinstance(trusted_proxies, str) \
            else tuple(trusted_proxies)

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Any:
        connection = environ.get("gunicorn.socket")
        if connection is not None:
            environ["wsgi.url_scheme"] = "https" if isinstance(connection, ssl.SSLSocket) else "http"
        if environ.get("REMOTE_ADDR") in self.trusted_proxies:
            return self.proxied(environ, start_response)
        return self.direct(environ, start_response)


class _SessionInterface(SecureCookieSessionInterface):
    """The session cookie is Secure over https, and sent only to this app's own path (under a proxy's prefix)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(super().get_cookie_secure(app) or request.is_secure)

    def get_cookie_path(self, app: Flask) -> str:
        return app.config["SESSION_COOKIE_PATH"] or request.script_root or "/"

    def get_signing_serializer(self, app: Flask) -> Any:
        if not app.secret_key:  # loaded by `flask run`, which opened no database: the key on first use
            app.secret_key = get_store().installation_key("session_key")
        return super().get_signing_serializer(app)


# Command line (docs/contract.md §5) ##########################################


class _Command(click.Command):
    """A command whose ConfigError or StoreError is a click error: one line, under `flask` too."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, StoreError) as exc:
            raise click.ClickException(str(exc)) from None


COMMAND_COMPANIONS = {"copy-db": "mmoref_postgres.py"}   # a command a companion file brings -> that file


class _ServeByDefault(click.Group):
    """User errors are one line on stderr and a non-zero exit. No command, or serve's options without it
    (`python mmoref_server.py --port 5055`), means `serve`; a companion file's command loads that file."""

    command_class = _Command

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> NoReturn:
        """Run the command and exit with its status, however `standalone_mode` is set."""
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            usage = getattr(exc, "ctx", None)
            more = f" (see {usage.command_path} --help)" if usage is not None else ""
            click.echo(f"error: {exc.format_message()}{more}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(result if isinstance(result, int) else 0)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        starts_with_option = bool(args) and args[0].startswith("-")
        if not args or (starts_with_option and args[0] not in (*ctx.help_option_names, "--version")):
            args = ["serve", *args]
        return super().parse_args(ctx, args)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_COMPANIONS:
            try:
                load_companion(COMMAND_COMPANIONS[cmd_name], f"the {cmd_name} command")
            except StoreError as exc:  # one line, under `flask` too
                raise click.ClickException(str(exc)) from None
        return super().get_command(ctx, cmd_name)


def _command_store(db_path: str | None, create: bool = False, server_id: str | None = None) -> Store:
    """The command's database, closed however the command ends (an open PostgreSQL pool would hold the exit
    for seconds and print warnings). Only commands that set an installation up (`create`) may make one;
    a `server_id` it lacks is refused, naming the database looked in."""
    settings = load_settings()
    path = db_path or settings["MMOREF_DB"]
    if not create and not is_database_url(path) and not os.path.exists(path):
        raise ConfigError(f"no database at {os.path.abspath(path)}: pass --db or set MMOREF_DB")
    store = open_store(path, synchronous=settings["MMOREF_SYNCHRONOUS"])
    context = click.get_current_context(silent=True)
    if context is not None:
        context.call_on_close(store.close)
    if server_id is not None and store.server(server_id) is None:
        raise ConfigError(f"unknown server {server_id!r} in {database_label(store.location)}: "
                          "check the id, or pass --db with the right database")
    return store


def set_password_command_line(db_path: str) -> str:
    """How to run set-password on this database: with --db unless it is ./referrals.db."""
    command = f"{COMMAND} set-password"
    if is_database_url(db_path):
        return f"{command} --db <the postgresql:// URL>"
    if os.path.abspath(db_path) == os.path.abspath(SETTINGS["MMOREF_DB"][1]):
        return command
    return f"{command} --db {shlex.quote(os.path.abspath(db_path))}"


_db_option = click.option("--db", "db_path", metavar="PATH|URL",
                          help="SQLite file or postgresql:// URL [env MMOREF_DB; ./referrals.db]")
_json_option = click.option("--json", "as_json", is_flag=True, help="machine-readable output")


def _server_command(name: str) -> Callable:
    """A command about one server: SERVER_ID, then --db and --json, then its own options."""
    def register(command: Callable) -> Callable:
        return cli.command(name)(click.argument("server_id")(_db_option(_json_option(command))))
    return register


def _emit(as_json: bool, data: Any, text: str) -> None:
    click.echo(json.dumps(data) if as_json else text)


@click.group(cls=_ServeByDefault)
@click.version_option(__version__, prog_name="mmoref")
def cli() -> None:
    """mmoref: the MMOLove Referral Kit ingest server.

    With no command, or with only serve's options (--host, --port, --db): serve.
    PostgreSQL databases and copy-db come with mmoref_postgres.py, beside this file."""


@cli.command("serve")
@_db_option
@click.option("--host", help="address to bind [env MMOREF_HOST; 127.0.0.1]")
@click.option("--port", type=click.IntRange(1, 65535), help="port [env MMOREF_PORT; 5000]")
def serve_command(db_path: str | None = None, host: str | None = None, port: int | None = None) -> None:
    """Serve the ingest endpoint, share links and dashboard (waitress)."""
    settings = load_settings()
    host, port = host or settings["MMOREF_HOST"], port or settings["MMOREF_PORT"]

    def app_made_after_binding(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        return app(environ, start_response)  # called only once server.run() below serves, after `app` is made

    server = _listen(app_made_after_binding, host, port, settings["MMOREF_THREADS"])
    # only now: a start on a busy port creates no database and never shows (or makes) a password
    app = create_app({"MMOREF_DB": db_path or settings["MMOREF_DB"]})
    _open_database(app)  # create_app leaves it to the first request when the `flask` command loads it
    _configure_logging(settings["MMOREF_LOG_FORMAT"])
    click.echo(_banner(app, host, port))
    if settings["MMOREF_PRUNE_AFTER"]:
        with app.app_context():
            start_auto_prune(get_store(), settings["MMOREF_PRUNE_AFTER"])
    server.run()


def _configure_logging(log_format: str) -> None:
    """`serve` logs to stderr: text lines, or one JSON object a line for log shippers."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth is N" on every busy request


# Chosen, not defaulted: with waitress's, ~100 idle connections stop the server for two minutes. A client sending
# a byte every few seconds on all 400 still holds them: only a buffering proxy (nginx, Caddy) in front stops that.
WAITRESS_OPTIONS: dict[str, Any] = {
    "connection_limit": 400,  # many kits and browsers, under the 512 sockets of select() on Windows; idle: no thread
    "channel_timeout": 30,  # longer than a kit's keep-alive; an abandoned socket holds its slot ~40 s at most
    "cleanup_interval": 10,
    "asyncore_use_poll": hasattr(select, "poll"),  # no 1024-descriptor ceiling; Windows has no poll()
    "clear_untrusted_proxy_headers": False,  # the app trusts them only from MMOREF_TRUSTED_PROXY
    "max_request_body_size": 4 * MAX_BODY_BYTES,
    "ident": "mmoref",
}


def _listen(app: Callable[..., Any], host: str, port: int, threads: int) -> Any:
    """A waitress server already bound to host:port (not yet serving); a failure is a ConfigError."""
    import waitress

    _allow_open_files(WAITRESS_OPTIONS["connection_limit"] + threads + 64)
    # waitress binds "::" IPv6-only (IPV6_V6ONLY): every interface means the IPv4 ones too
    where: dict[str, Any] = {"listen": f"0.0.0.0:{port} [::]:{port}"} if host == "::" else {"host": host, "port": port}
    try:
        return waitress.create_server(app, threads=threads, **where, **WAITRESS_OPTIONS)
    except ValueError:  # waitress: getaddrinfo() found no such address
        cause = "not a local address or host name"
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is in use: pass --port or set MMOREF_PORT") from None
        if exc.errno == errno.EACCES:
            raise ConfigError(f"no permission to listen on port {port} on {host}: pass --port (above 1023) or set"
                              " MMOREF_PORT") from None
        cause = exc.strerror or str(exc)
    raise ConfigError(f"cannot listen on {host}: {cause}: pass --host or set MMOREF_HOST")


def _allow_open_files(wanted: int) -> None:
    """Raise the soft open-file limit towards `wanted` (macOS starts at 256) where the OS lets us."""
    try:
        import resource
    except ImportError:  # Windows: no such limit on sockets
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # listening everywhere -> what this machine's browser uses


def _banner(app: Flask, host: str, port: int) -> str:
    shown = ANY_ADDRESS.get(host, host)
    base = f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"
    lines = [
        f"mmoref {__version__}: referral ingest server",
        f"  ingest     POST {base}/api/referral/events",
        f"  dashboard  {base}/dashboard",
        f"  database   {database_label(app.config['MMOREF_DB'])}",
        f"  try        curl -i {base}/api/referral/events -d '{{}}'    "
        "# 400 missing signature header: the server is up",
        *_login_lines(app),
    ]
    if host in ANY_ADDRESS:  # how other machines reach it
        families = ":: and 0.0.0.0: IPv6 and IPv4" if host == "::" else "0.0.0.0: IPv4; --host :: adds IPv6"
        lines.append(f"  note       listening on every network interface ({families}); other machines use "
                     f"http://<this machine's address>:{port}")
    if not _is_loopback(host):
        lines.append(f"  warning    the dashboard and the ingest endpoint are reachable from the network on {host}, "
                     "over plain HTTP: for anything public, listen on 127.0.0.1 behind a TLS proxy "
                     "(docs/production.md)")
    return "\n".join(lines)


def _login_lines(app: Flask) -> list[str]:
    """How to log in to the dashboard; on first run, make a password and show it once."""
    if app.config.get("MMOREF_ADMIN_PASSWORD"):
        return ["  login      the password in MMOREF_ADMIN_PASSWORD"]
    store = app.extensions["mmoref"]
    if store.admin_password_hash():
        return [f"  login      your dashboard password (change it: {set_password_command_line(store.location)})"]
    password = secrets.token_urlsafe(12)
    store.set_admin_password(password)
    return [f"  login      password {password}   (shown once, stored hashed; change it with "
            f"{set_password_command_line(store.location)})"]


@cli.command("set-password")
@_db_option
@click.option("--password", prompt="New dashboard password", hide_input=True, confirmation_prompt=True,
              help="the new password (prompted for when omitted)")
def set_password_command(db_path: str | None, password: str) -> None:
    """Set the dashboard password (stored as a salted hash); logs every session out."""
    _command_store(db_path, create=True).set_admin_password(password)
    click.echo("dashboard password changed")


@cli.command("add-server")
@click.argument("server_id")
@click.option("--game", required=True, help="game slug, used in dashboard URLs")
@click.option("--name", default="", help="display name")
@click.option("--registration-url", help="where the share link sends players (https://)")
@click.option("--identity-field", type=click.Choice(IDENTITY_FIELDS), default="username", show_default=True)
@_db_option
@_json_option
def add_server_command(server_id: str, game: str, name: str, registration_url: str | None, identity_field: str,
                       db_path: str | None, as_json: bool) -> None:
    """Create a server with referrals enabled; print its first secret once."""
    secret, kid = _command_store(db_path, create=True).add_server(server_id, game, name, registration_url,
                                                               identity_field)
    _emit(as_json, {"server_id": server_id, "game": game, "secret": secret, "kid": kid},
          f"server {server_id} created (game {game}), referrals enabled\n"
          f"signing secret (shown once, store it in your game server's config):\n  {secret}\nkid: {kid}")
    if not registration_url:  # on stderr: --json output stays the documented object
        click.echo(f"warning: no --registration-url, so the share link /r/{server_id} answers 404 until one is"
                   f" set: on the dashboard, /dashboard/{game}/{server_id}/referrals, under Registration", err=True)


@_server_command("rotate-secret")
@click.option("--grace", type=int, default=DEFAULT_GRACE_SECONDS, show_default=True,
              help="seconds the previous secret stays valid; 0 revokes it now")
def rotate_secret_command(server_id: str, grace: int, db_path: str | None, as_json: bool) -> None:
    """Make a new signing secret; print it once."""
    secret, kid = _command_store(db_path, server_id=server_id).rotate_secret(server_id, grace)
    previous = "revoked now" if grace == 0 else f"valid for {grace} more seconds"
    _emit(as_json, {"secret": secret, "kid": kid},
          f"new signing secret (shown once):\n  {secret}\nkid: {kid}\nprevious secret: {previous}")


@_server_command("mint-token")
@click.option("--ref", "code", required=True, help="the referrer's code")
def mint_token_command(server_id: str, code: str, db_path: str | None, as_json: bool) -> None:
    """Mint an mmref token as if the share link were followed."""
    token, referral_id = _command_store(db_path, server_id=server_id).mint_referral(server_id, code)
    _emit(as_json, {"token": token, "referral_id": referral_id}, f"token: {token}\nreferral: {referral_id}")


@_server_command("log")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
def log_command(server_id: str, limit: int, db_path: str | None, as_json: bool) -> None:
    """Print the delivery log, newest first."""
    store = _command_store(db_path, server_id=server_id)
    rows = [{"id": r["id"], "event": r["event"], "state": r["state"], "outcome": r["outcome"],
             "server_event_id": r["server_event_id"], "received_at": iso_utc(r["received_at"]),
             "referral_id": r["referral_id"], "ts": r["ts"]} for r in store.delivery_log(server_id, limit)]
    lines = [f"{row['received_at']}  {row['event']:<10} {row['outcome']:<20} {row['state']:<10} "
             f"{row['referral_id']}  {row['server_event_id'] or '-'}" for row in rows]
    _emit(as_json, rows, "\n".join(lines) or "(no events yet)")


def _owner_command(action: str) -> None:
    @cli.command(action, help=f"{action.capitalize()} a referral as the owner (logged as an owner action).")
    @_db_option
    @_json_option
    @click.argument("referral_id")
    def owner_action_command(referral_id: str, db_path: str | None, as_json: bool) -> None:
        store = _command_store(db_path)
        try:
            state = owner_action(store, referral_id, action)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (database {database_label(store.location)})") from None
        _emit(as_json, {"referral_id": referral_id, "state": state}, f"{referral_id} is now {state}")


for _action in OWNER_ACTIONS:
    _owner_command(_action)


@cli.command("send")
@click.argument("event", type=click.Choice(EVENTS))
@click.option("--endpoint", required=True, help="e.g. http://127.0.0.1:5000/api/referral/events")
@click.option("--server-id", required=True)
@click.option("--secret", required=True)
@click.option("--token", required=True, help="the player's mmref token")
@click.option("--referee-identity", help="the new player's identity (required by registered)")
@click.option("--server-event-id", help="idempotency key [default: a new random one]")
@click.option("--kid", help="which secret signs (optional)")
@click.option("--test", is_flag=True, help="dry run: verified, nothing written")
@click.option("--cacert", type=click.Path(exists=True, dir_okay=False), metavar="FILE", help="trust the CA "
              "certificates in FILE (PEM) for an https endpoint, instead of the system's (or SSL_CERT_FILE's)")
@_json_option
def send_command(event: str, endpoint: str, server_id: str, secret: str, token: str, referee_identity: str | None,
                 server_event_id: str | None, kid: str | None, test: bool, cacert: str | None, as_json: bool) -> None:
    """Sign and POST one event, like a game server's kit would; exit 0 on 2xx."""
    body = build_body(event, token, server_id, server_event_id or f"evt-{secrets.token_hex(6)}",
                      referee_identity=referee_identity, test=test)
    result = send_event(endpoint, secret, body, kid=kid, cafile=cacert)
    if result["error"]:
        raise ConfigError(result["error"])
    shown = json.dumps(result["body"]) if not isinstance(result["body"], str) else result["body"]
    _emit(as_json, {"status": result["status"], "body": result["body"]}, f"HTTP {result['status']}\n{shown}")
    if not 200 <= result["status"] < 300:
        sys.exit(1)


def _duration_option(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_duration(value)
    except ValueError as accepted:
        raise click.BadParameter(f"{value!r} is not {accepted}", ctx, param) from None


@cli.command("backup")
@click.argument("dest", metavar="DEST")
@click.option("--force", is_flag=True, help="replace DEST if it is an existing file")
@_db_option
@_json_option
def backup_command(dest: str, force: bool, db_path: str | None, as_json: bool) -> None:
    """Copy the database to DEST (a file, or a folder for a dated file) while the server runs.

    The copy is one consistent snapshot (SQLite's backup API: ingest goes on), checked with PRAGMA integrity_check
    before it is renamed into place."""
    result = write_backup(_command_store(db_path), dest, force)
    _emit(as_json, result, f"backup written: {result['path']}\n{result['bytes']:,} bytes in {result['seconds']} s,"
                           f" integrity ok\nrows: " + ", ".join(f"{k} {v:,}" for k, v in result["rows"].items()))


@cli.command("restore")
@click.argument("source", metavar="SRC")
@_db_option
@_json_option
def restore_command(source: str, db_path: str | None, as_json: bool) -> None:
    """Replace the database with the backup SRC (stop the server first).

    SRC must pass the integrity check; the current database is kept beside it as <db>.before-restore-<time>."""
    result = restore_database(source, db_path or load_settings()["MMOREF_DB"])
    _emit(as_json, result, f"restored {result['path']} from {result['restored_from']}\n"
                           f"previous database kept as {result['previous'] or '(there was none)'}\nrows: "
                           + ", ".join(f"{k} {v:,}" for k, v in result["rows"].items()))


@cli.command("prune")
@click.option("--older-than", required=True, metavar="AGE", callback=_duration_option,
              help="delete log rows received longer ago than this: 180d, 12h, 30m or 3600s")
@_db_option
@_json_option
def prune_command(older_than: int, db_path: str | None, as_json: bool) -> None:
    """Delete old delivery-log and rejected-request rows; keep referrals, anchors, counters.

    Deletes in batches of 1,000 rows (ingest waits at most one batch), then gives the space back. Safe while the
    server runs."""
    result = prune(_command_store(db_path), older_than)
    deleted = result["deleted"]
    _emit(as_json, result, f"deleted {deleted['delivery_log']:,} delivery-log and {deleted['rejected_requests']:,}"
                           f" rejected-request rows in {result['seconds']} s\ndatabase: {result['bytes_before']:,}"
                           f" -> {result['bytes_after']:,} bytes")


@cli.command("forget")
@click.option("--server", "server_id", required=True, help="the server the player registered on")
@click.option("--identity", required=True, help="the referee_identity to erase (e.g. an e-mail address)")
@_db_option
@_json_option
def forget_command(server_id: str, identity: str, db_path: str | None, as_json: bool) -> None:
    """Erase a player's identity (personal data) from everything stored.

    It is replaced by a keyed one-way value, so the player still cannot be registered through another referrer.
    Rewrites the database file (VACUUM) so no copy is left."""
    try:
        result = forget(_command_store(db_path), server_id, identity)
    except NothingToForget as exc:
        if as_json:
            click.echo(json.dumps(exc.answer))
        raise
    done = "already forgotten" if result.get("forgotten_before") else "forgotten"
    lines = [f"{done} on {server_id}; stored as {result['forgotten_as']}",
             "rows changed: " + ", ".join(f"{k} {v}" for k, v in result["rows_changed"].items())]
    if "server_event_id_kept" in result:
        lines.append(kept_event_ids_line(result["server_event_id_kept"]))
    _emit(as_json, result, "\n".join(lines))


def kept_event_ids_line(row_ids: Sequence[int], shown: int = 10) -> str:
    """What `forget` says of the log rows whose server_event_id holds the identity."""
    listed = ", ".join(map(str, row_ids[:shown])) + (f", … ({len(row_ids)} rows)" if len(row_ids) > shown else "")
    return (f"kept: the server_event_id of delivery-log rows {listed} holds the identity; it is the key that"
            " makes a retry of those events a duplicate (docs/operations.md, Forgetting a player)")


DEMO_SERVER_ID, DEMO_GAME, DEMO_SECRET = "demo-server", "demo-game", "demo-secret-not-for-production"


@cli.command("demo")
@click.argument("path")
@click.option("--force", is_flag=True, help="replace PATH if it exists")
def demo_command(path: str, force: bool) -> None:
    """Write a demo database (how referrals.db.example is made)."""
    # a demo server, referrals in every state, log rows and rejections, all through the real store and pipeline
    if os.path.exists(path):
        if not force:
            raise ConfigError(f"{path} exists; pass --force to replace it")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + suffix)
    store = open_store(path)
    store.add_server(DEMO_SERVER_ID, DEMO_GAME, "Demo Server", "http://localhost:8080/register", "username")
    store.set_secret(DEMO_SERVER_ID, DEMO_SECRET)  # a well-known secret, so the README can show it
    ttl = SETTINGS["MMOREF_TOKEN_TTL"][1]

    def deliver(token: str, event: str, event_id: str, referee: str | None = None, secret: str = DEMO_SECRET) -> None:
        body = build_body(event, token, DEMO_SERVER_ID, event_id, referee_identity=referee)
        handle_ingest(store, body, signature_header(secret, body), window=300, ttl=ttl)

    plan = [("alice", 0), ("alice", 1), ("alice", 2), ("bob", 2), ("bob", 3), ("carol", 1), ("dave", 1)]  # code, events
    for number, (code, events) in enumerate(plan):
        token, referral_id = store.mint_referral(DEMO_SERVER_ID, code)
        for event in EVENTS[:events]:
            deliver(token, event, f"{event[:3]}-{number}", referee=f"player-{1000 + number}")
    owner_action(store, referral_id, "reject")  # the last one, dave's
    old_token, _ = store.mint_referral(DEMO_SERVER_ID, "erin", issued_at=now() - ttl - 3600)
    deliver(old_token, "registered", "reg-old", referee="player-late")           # -> expired (422)
    rival, _ = store.mint_referral(DEMO_SERVER_ID, "frank")
    deliver(rival, "registered", "reg-rival", referee="player-1001")             # first-touch conflict
    deliver(rival, "qualified", "qua-rival", secret="wrong-secret")             # 401 mac_mismatch
    deliver("forged-token", "registered", "reg-forged", referee="player-x")     # 404 unknown token
    handle_ingest(store, b'{"event":"registered"}', None, window=300, ttl=ttl)  # 400, installation-wide
    store.close()
    click.echo(f"demo database written to {path}; demo server {DEMO_SERVER_ID}, demo secret {DEMO_SECRET}")


# Kit-side sender #############################################################
# What a game server does (like the PHP vote-callback drop-ins owners know); "Send test event" and `send` use it.


def build_body(event: str, token: str, server_id: str, server_event_id: str, *,
               referee_identity: str | None = None, test: bool = False, ts: int | None = None) -> bytes:
    """Serialise the event once; sign and send exactly these bytes."""
    body: dict[str, Any] = {"event": event, "token": token, "server_id": server_id,
                            "server_event_id": server_event_id, "ts": now() if ts is None else ts}
    if referee_identity is not None:
        body["referee_identity"] = referee_identity
    if test:
        body["test"] = True
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def send_event(endpoint: str, secret: str, body: bytes, *, kid: str | None = None,
               timeout: float = 10.0, cafile: str | None = None) -> dict[str, Any]:
    """POST a signed body; return {"status": int | None, "body": parsed JSON or text, "error": str | None}.

    An https endpoint's certificate must chain to a CA the system trusts (or SSL_CERT_FILE
    names), or to one in `cafile` (PEM) when given: for a private CA or a self-signed server.

    Worked example (runs as-is against `python mmoref_server.py` after
    `python mmoref_server.py add-server srv_123 --game mygame` and `mint-token srv_123 --ref alice`):

        body = build_body("registered", TOKEN, "srv_123", "reg-7842", referee_identity="player-7842")
        result = send_event("http://127.0.0.1:5000/api/referral/events", SECRET, body)
        # {"status": 200, "body": {"ok": True, "referral_id": "ref_…", "state": "registered"}, "error": None}
    """
    request_ = urllib.request.Request(endpoint, data=body, method="POST", headers={
        "Content-Type": "application/json", SIGNATURE_HEADER: signature_header(secret, body, kid=kid)})
    try:
        context = ssl.create_default_context(cafile=cafile) if cafile is not None else None
    except (ssl.SSLError, OSError) as exc:
        return {"status": None, "body": None, "error": f"cannot use {cafile} as the CA certificate: {exc}"}
    try:
        with urllib.request.urlopen(request_, timeout=timeout, context=context) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        untrusted = ("; to trust the server's certificate, pass --cacert FILE or set SSL_CERT_FILE"
                     if isinstance(reason, ssl.SSLCertVerificationError) else "")
        return {"status": None, "body": None, "error": f"cannot reach {endpoint}: {reason}{untrusted}"}
    text = raw.decode("utf-8", "replace")
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        parsed = text
    return {"status": status, "body": parsed, "error": None}


# Templates and style sheet ###################################################
# Jinja templates (autoescaped), one per page; the style sheet first, as the base template includes it.

STYLE_SHEET = """
:root { --ink: #1d2330; --muted: #5c6475; --line: #d9dde5; --bg: #f6f7f9; --accent: #2f5bd3; --ok: #1c7c3a;
        --bad: #b3261e; }
* { box-sizing: border-box; }  main { max-width: 72rem; margin: 0 auto; padding: 1rem; }
body { margin: 0; font: 15px/1.5 system-ui, sans-serif; color: var(--ink); background: var(--bg); }
header { display: flex; justify-content: space-between; align-items: center; padding: .6rem 1rem; background: #fff;
         border-bottom: 1px solid var(--line); }
header a { font-weight: 700; text-decoration: none; color: var(--ink); }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 1rem; margin: 0 0 1rem; }
h1 { font-size: 1.4rem; margin: .2rem 0 1rem; }  h2 { font-size: 1.1rem; margin: 0 0 .6rem; }
label { display: block; margin: .4rem 0 .1rem; font-weight: 600; }
input, select { font: inherit; padding: .35rem .5rem; border: 1px solid var(--line); border-radius: 4px;
                max-width: 100%; }
button { font: inherit; padding: .35rem .8rem; border: 1px solid var(--accent); background: var(--accent); color: #fff;
         border-radius: 4px; cursor: pointer; }
button.plain { background: #fff; color: var(--accent); }  button:disabled { opacity: .5; cursor: not-allowed; }
.row { display: flex; flex-wrap: wrap; gap: .6rem; align-items: end; }  .row > * { margin: 0; max-width: 100%; }
.scroll { overflow-x: auto; background: linear-gradient(to right, #fff 2rem, #fff0) left / 3rem 100%,
          linear-gradient(to left, #fff 2rem, #fff0) right / 3rem 100%,
          radial-gradient(farthest-side at 0 50%, #0004, #0000) left / 1rem 100%,
          radial-gradient(farthest-side at 100% 50%, #0004, #0000) right / 1rem 100%;
          background-repeat: no-repeat; background-attachment: local, local, scroll, scroll; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid var(--line); white-space: nowrap; }
.secret { font: 1rem ui-monospace, monospace; background: #fff7d6; border: 1px solid #e6c84f; padding: .6rem;
          word-break: break-all; }
.flash { background: #eef3ff; border: 1px solid #c9d6fb; padding: .5rem; border-radius: 4px; }
.error { color: var(--bad); }  .ok { color: var(--ok); }  .muted { color: var(--muted); }
pre { background: var(--bg); padding: .6rem; white-space: pre-wrap; overflow-wrap: anywhere; }
.funnel { display: flex; gap: 1rem; flex-wrap: wrap; }  .funnel div { min-width: 7rem; }
.funnel strong { display: block; font-size: 1.5rem; }  .pager { display: flex; gap: 1rem; margin-top: .5rem; }
svg .clicked { fill: #9fb4ee; }  svg .registered { fill: #2f5bd3; }  svg .qualified { fill: #1c7c3a; }
.rejected td { white-space: normal; vertical-align: top; }  .rejected td:first-child { white-space: nowrap; }
.rejected td:nth-child(n+5) { min-width: 14rem; }  .rejected code { word-break: break-all; }
table.wrap td { white-space: normal; overflow-wrap: anywhere; }
@media (max-width: 40rem) {  /* a phone: each row of a list is a card of labelled cells, nothing scrolls sideways */
  .scroll > table thead { display: none; }  .scroll > table, .scroll > table tbody { display: block; }
  .scroll > table tr { display: flex; flex-wrap: wrap; gap: .1rem 1rem; padding: .5rem 0;
                       border-bottom: 1px solid var(--line); }
  .scroll > table td { display: block; min-width: 0; max-width: 100%; padding: 0; border: 0;
                       white-space: normal; overflow-wrap: anywhere; }
  .scroll > table td[data-label]::before { content: attr(data-label) ": "; color: var(--muted); }
  .scroll > table td:empty { display: none; }  .rejected td:nth-child(n+5) { min-width: 0; flex-basis: 100%; }
}
form.inline { display: inline; }  .axis { display: flex; justify-content: space-between; margin: 0; font-size: .8rem; }
"""

TEMPLATES = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True, loader=jinja2.DictLoader({
    "macros.html": """
{# every form carries the session's CSRF token #}
{% macro csrf_field() %}<input type="hidden" name="csrf_token" value="{{ csrf_token() }}">{% endmacro %}
{# a list, each row's cells from the call block ({% call(row) scroll_table(...) %}), `data` its data-* attributes #}
{% macro scroll_table(columns, rows, empty=none, id=none, css_class=none, data={}) %}
<div class="scroll"><table{% if id %} id="{{ id }}"{% endif %}{% if css_class %} class="{{ css_class }}"{% endif %}>
<thead><tr>{% for column in columns %}<th>{{ column }}</th>{% endfor %}</tr></thead><tbody>
{% for row in rows %}
<tr{% for name, key in data.items() %} data-{{ name }}="{{ row[key] }}"{% endfor %}>{{ caller(row) }}</tr>
{% else %}
{% if empty %}<tr><td colspan="{{ columns|length }}">{{ empty }}</td></tr>{% endif %}
{% endfor %}
</tbody></table></div>
{% endmacro %}
{% macro name_field(name, label, value) %}
<div><label for="{{ name }}">{{ label }}</label>
  <input id="{{ name }}" name="{{ name }}" required pattern="[A-Za-z0-9_.\\-]{1,64}" value="{{ value or '' }}"
         title="1-64 characters: letters A-Z a-z, digits 0-9 and _ . - (not only dots)"></div>
{% endmacro %}
{% macro select(id, name, label, choices, chosen, any=false) %}
<div><label for="{{ id }}">{{ label }}</label><select id="{{ id }}" name="{{ name }}">
{% if any %}<option value="">any</option>{% endif %}
{% for choice in choices %}<option{% if choice == chosen %} selected{% endif %}>{{ choice }}</option>{% endfor %}
</select></div>
{% endmacro %}
{% macro registration_fields(url, identity_field, choices) %}
<div><label for="registration_url">Registration URL</label>
  <input id="registration_url" name="registration_url" type="url" size="40" value="{{ url or '' }}"
         placeholder="https://yourgame.example/register"></div>
{{ select("identity_field", "identity_field", "Identity field", choices, identity_field) }}
{% endmacro %}
{% macro rejected_section(title, rows, id=none) %}
<section{% if id %} id="{{ id }}"{% endif %}><h2>{{ title }}</h2>
{% if not rows %}
<p class="muted">None.</p>
{% else %}
{% call(r) scroll_table(["Time", "Status", "Error", "Reason", "Hint", "Body"], rows, css_class="rejected",
                        data={"status": "status"}) %}
<td data-label="Time">{{ iso_utc(r.last_seen_at) }}{% if r.repeats > 1 %}<br>
  <span class="repeats">{{ r.repeats }} times since {{ iso_utc(r.received_at) }}</span>{% endif %}</td>
<td data-label="Status">{{ r.status }}</td><td data-label="Error">{{ r.error }}</td>
<td data-label="Reason">{{ r.reason or "" }}</td><td data-label="Hint">{{ r.hint }}
  {%- if r.diagnosis %}<br><strong class="diagnosis">{{ r.diagnosis }}</strong>{% endif %}</td>
<td data-label="Body"><code>{{ r.snippet[:120] }}</code></td>
{% endcall %}
{% endif %}
</section>
{% endmacro %}""",

    "base.html": """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} · mmoref</title><style nonce="{{ style_nonce }}">""" + STYLE_SHEET + """</style></head>
<body><header><a href="{{ url_for('mmoref.dashboard.index') }}">mmoref</a>
{% if logged_in %}<form method="post" action="{{ url_for('mmoref.dashboard.logout') }}">{{ csrf_field() }}
  <button class="plain">Log out</button></form>{% endif %}
</header>
<main>
{% for message in messages %}<p class="flash" role="status">{{ message }}</p>{% endfor %}
{% block main %}{% endblock %}
</main></body></html>
""",

    "message.html": """{% extends "base.html" %}{% block main %}
<section><h1>{{ title }}</h1><p>{{ message }}</p></section>{% endblock %}
""",

    "forget.html": """{% extends "base.html" %}{% block main %}
<h1>Forget {{ referral.referee_identity }}?</h1>
<p>This erases the identity from referrals, anchors, stored payloads and rejected requests on {{ server.server_id }},
  and rewrites the database file. A keyed one-way value takes its place, so the player still cannot be registered
  through another referrer. It cannot be undone.</p>
<form method="post" id="confirm-forget">{{ csrf_field() }}<input type="hidden" name="confirm" value="yes">
  <button id="forget-confirm">Forget this player</button> <a href="{{ tab_url(server) }}">Cancel</a></form>
{% endblock %}
""",

    "login.html": """{% extends "base.html" %}{% block main %}
<section><h1>Log in</h1>
{% if error %}<p class="error" role="alert">{{ error }}</p>{% endif %}
{% if wrong_password %}<p class="muted" id="reset-password">Forgotten it? On the server, run
  <code>{{ command }} set-password</code> (with <code>--db</code> when its database is not <code>./referrals.db</code>);
  when <code>MMOREF_ADMIN_PASSWORD</code> is set, change that and restart.</p>{% endif %}
{% if no_password %}<p class="error">No dashboard password is set yet: run <code>{{ set_password_command }}</code>
  or set <code>MMOREF_ADMIN_PASSWORD</code>.</p>{% endif %}
<form method="post">{{ csrf_field() }}<label for="password">Password</label>
  <input id="password" name="password" type="password" autocomplete="current-password" required autofocus>
  <button>Log in</button></form></section>
{% endblock %}
""",

    "index.html": """{% extends "base.html" %}{% block main %}
<h1>Servers</h1>
{% if new_secret %}
<section id="new-secret"><h2>Server {{ new_secret.server_id }} created</h2>
<p>Its signing secret, shown <strong>once</strong>: copy it into your game server's config now.</p>
<p class="secret" id="secret-value">{{ new_secret.secret }}</p><p class="muted">kid {{ new_secret.kid }}</p>
{% if new_secret.no_registration_url %}<p class="error" id="no-registration-url">No registration URL yet: its share
  link answers 404 until you set one under Registration on its Referrals tab.</p>{% endif %}
<p><a href="{{ tab_url(new_secret) }}">Open its Referrals tab</a></p></section>
{% endif %}
<section>
{% call(server) scroll_table(["Server", "Game", "Referrals", "Funnel: clicks → registered → qualified (reversed)"],
                             servers, "No servers yet: add one below.", id="servers", data={"server": "server_id"}) %}
{% set f = funnels.get(server.server_id, {}) %}
<td data-label="Server"><a href="{{ tab_url(server) }}">{{ server.name or server.server_id }}</a>
  {%- if server.name %} <span class="muted">{{ server.server_id }}</span>{% endif %}</td>
<td data-label="Game">{{ server.game }}</td>
<td data-label="Referrals">{{ "on" if server.referrals_enabled else "off" }}</td>
<td data-label="Clicks → registered → qualified (reversed)">{{ f.clicked or 0 }} → {{ f.registered or 0 }} →
  {{- " " ~ (f.qualified or 0) }} ({{ f.reversed or 0 }})</td>
{% endcall %}
</section>
<section><h2>Add server</h2>
{% if error %}<p class="error" role="alert">{{ error }}</p>{% endif %}
<form method="post" action="{{ url_for('mmoref.dashboard.add_server_form') }}" class="row">{{ csrf_field() }}
{{ name_field("server_id", "Server id", form.server_id) }}{{ name_field("game", "Game", form.game) }}
<div><label for="name">Name</label><input id="name" name="name" value="{{ form.name or '' }}"></div>
{{ registration_fields(form.registration_url, form.identity_field, identity_fields) }}
<div><button>Add server</button></div></form></section>
{{ rejected_section("Rejected requests naming no known server", rejected) }}
{% endblock %}
""",

    "referrals.html": """{% extends "base.html" %}{% block main %}
<h1>{{ server.name or server.server_id }} <span class="muted">· {{ server.game }} · Referrals</span></h1>
{% if new_secret %}
{% set previous = new_secret.previous %}
<section id="new-secret"><h2>New signing secret</h2>
<p>Shown <strong>once</strong>: copy it into your game server's config now.
  {%- if previous %} <span id="previous-secret">The previous secret {% if previous.until %}stays valid for
  {{- " " ~ previous.grace }} (until {{ previous.until }}).{% else %}is revoked.{% endif %}</span>{% endif %}</p>
<p class="secret" id="secret-value">{{ new_secret.secret }}</p><p class="muted">kid {{ new_secret.kid }}</p></section>
{% endif %}
{% if new_token %}
<section id="new-token"><h2>Test token for referral {{ new_token.referral_id }}</h2>
<p class="secret" id="token-value">{{ new_token.token }}</p>
<p class="muted">A test referral: its click and events are left out of the analytics.</p></section>
{% endif %}
<section id="connect"><h2>Connect your game server</h2>
<p>Your game server POSTs signed events to this address, with this server id and the secret shown once when it was
  made (this page never shows it again).</p>
<table class="wrap"><tr><th>Ingest URL</th><td><code id="connect-url">{{ connect.url }}</code></td></tr>
<tr><th>server_id</th><td><code id="connect-server-id">{{ connect.server_id }}</code></td></tr>
<tr><th>kid</th><td><code id="connect-kid">{{ connect.kid or "no secret yet" }}</code></td></tr></table>
<h3>With curl and openssl</h3><pre id="connect-shell">{{ connect.shell }}</pre>
<h3>With Python (mmoref's <code>send</code> command)</h3><pre id="connect-python">{{ connect.python }}</pre></section>
<section id="status"><h2>Status</h2>
<form method="post" action="{{ server_url('set_enabled', server) }}">{{ csrf_field() }}
{% set enabled = server.referrals_enabled %}
<p class="{{ 'ok' if enabled else 'error' }}">Referrals are {{ "enabled" if enabled else "disabled" }}.</p>
<input type="hidden" name="enabled" value="{{ 0 if enabled else 1 }}">
<button{% if enabled %} class="plain"{% endif %}>{{ "Disable" if enabled else "Enable" }} referrals</button>
</form></section>
<section id="secrets"><h2>Signing secret</h2>
{% call(s) scroll_table(["kid", "Secret", "Status"], secrets[:5], "No secret yet.") %}
<td data-label="kid">{{ s.kid }}</td><td data-label="Secret">…{{ s.last4 }}</td><td data-label="Status">
  {%- if s.expires_at is none %}current{% elif s.expires_at > now %}valid until {{ iso_utc(s.expires_at) }}
  {%- else %}revoked{% endif %}</td>
{% endcall %}
{% for s in in_grace %}
<p class="error" id="rotation-revokes">Rotating again now revokes secret {{ s.kid }} (ends in …{{ s.last4 }}, valid
  until {{ iso_utc(s.expires_at) }}) at once: game servers still signing with it will be refused.</p>
{% endfor %}
<form method="post" class="row" action="{{ server_url('rotate_secret_form', server) }}">{{ csrf_field() }}
<input type="hidden" name="rotation" value="{{ rotation_nonce }}">
<div><label for="grace">The previous secret</label><select id="grace" name="grace">
{% for value, label in grace_choices.items() %}
<option value="{{ value }}"{% if value == "86400" %} selected{% endif %}>
  {{- "revoke now" if value == "0" else "stays valid " ~ label }}</option>
{% endfor %}
</select></div>
<div><button>{{ "Rotate secret" if has_secret else "Generate secret" }}</button></div></form></section>
<section id="settings"><h2>Registration</h2>
<form method="post" class="row" action="{{ server_url('settings_form', server) }}">{{ csrf_field() }}
{{ registration_fields(server.registration_url, server.identity_field, identity_fields) }}
<div><button>Save</button></div></form>
{% if not server.registration_url %}<p class="error" id="no-registration-url">No registration URL yet: the share link
  answers 404 until you set one here.</p>{% endif %}
<label for="share-link">Share link (players add their code)</label>
<input id="share-link" readonly size="50" value="{{ share_link }}PLAYERCODE">
<form method="post" class="row" action="{{ server_url('mint_token_form', server) }}">{{ csrf_field() }}
<div><label for="ref">Referrer code</label><input id="ref" name="ref" required value="tester"></div>
<div><button class="plain">Mint a test token</button></div></form></section>
<section id="test-event"><h2>Send test event</h2>
<p class="muted">Signs a <code>"test": true</code> registered event with the current secret and runs it through the
  real ingest pipeline. Nothing is written to the delivery log.</p>
<form method="post" action="{{ server_url('send_test_event', server) }}">{{ csrf_field() }}
<button id="send-test-event"{% if not has_secret %} disabled{% endif %}>Send test event</button>
{% if not has_secret %}<span class="muted">Generate a secret first: the test event is signed with it.</span>{% endif %}
</form>
{% if test_result %}<div id="test-result" data-status="{{ test_result.status }}">
<p class="{{ 'ok' if test_result.status == 200 else 'error' }}">HTTP {{ test_result.status }}</p>
<pre>{{ test_result.body }}</pre></div>{% endif %}</section>
{% set f, chart = analytics.funnel, analytics.chart %}
<section id="analytics"><h2>Analytics</h2>
<div class="funnel"><div>Clicks<strong id="funnel-clicked">{{ f.clicked }}</strong></div>
<div>Registered<strong id="funnel-registered">{{ f.registered }}</strong>{{ analytics.registered_rate }} of clicks</div>
<div>Qualified<strong id="funnel-qualified">{{ f.qualified }}</strong>{{ analytics.qualified_rate }} of registered</div>
<div>Reversed<strong id="funnel-reversed">{{ f.reversed }}</strong></div></div>
<h3>Last 30 days</h3>
<svg id="daily-chart" role="img" aria-label="Daily clicks, registrations and qualifications"
     viewBox="0 0 {{ chart.width }} 112" width="100%" height="140" preserveAspectRatio="none">
{% for bar in chart.bars %}
<rect class="{{ bar.kind }}" x="{{ bar.x }}" y="{{ bar.y }}" width="5" height="{{ bar.height }}">
  <title>{{ bar.label }}</title></rect>
{% endfor %}
</svg>
<p class="axis muted" id="chart-axis">{% for day in chart.axis %} <span>{{ day }}</span>{% endfor %}</p>
<p class="muted" id="chart-note">{% if chart.peak %}Bars per day: clicks (light), registered (blue), qualified (green);
  peak {{ chart.peak }}.{% else %}No clicks, registrations or qualifications in the last 30 days.{% endif %}</p>
<h3>Top referrers (by qualified)</h3>
{% call(r) scroll_table(["Referrer", "Clicks", "Registered", "Qualified"], analytics.leaders,
                        "No qualified referrals yet.", id="leaderboard") %}
<td data-label="Referrer">{{ r.referrer_code }}</td><td data-label="Clicks">{{ r.clicked }}</td>
<td data-label="Registered">{{ r.registered }}</td><td data-label="Qualified">{{ r.qualified }}</td>
{% endcall %}
</section>
<section id="log"><h2>Delivery log</h2>
<form method="get" class="row" action="{{ tab_url(server) }}">
{{ select("f-event", "event", "Event", log_events, filters.event, any=true) }}
{{ select("f-outcome", "outcome", "Outcome", outcomes, filters.outcome, any=true) }}
<div><label for="f-q">server_event_id or referrer code</label><input id="f-q" name="q" value="{{ filters.q or '' }}">
</div><div><button class="plain">Filter</button></div><div><a href="{{ csv_url }}">Export CSV</a></div></form>
{% call(row) scroll_table(["Received", "Event", "State now", "Outcome", "server_event_id", "Referrer", "Referee",
                          "Token", ""], log_rows, "No events" ~ (" match these filters" if filters else " yet") ~ ".",
                          id="delivery-log", data={"id": "id", "event": "event", "state": "state",
                                                   "outcome": "outcome"}) %}
<td data-label="Received">{{ row.received }}</td><td data-label="Event">{{ row.event }}</td>
<td data-label="State now">{{ row.state }}</td><td data-label="Outcome">{{ row.outcome }}</td>
<td data-label="server_event_id">{{ row.server_event_id or "" }}</td>
<td data-label="Referrer">{{ row.referrer_code }}</td><td data-label="Referee">{{ row.referee_masked }}</td>
<td data-label="Token">{{ row.token_masked }}</td>
<td><a class="detail" href="{{ server_url('log_detail', server, row_id=row.id) }}">details</a></td>
{% endcall %}
<nav class="pager">{% if newer_url %}<a id="newer" href="{{ newer_url }}">← newer</a>{% endif %}
  {% if older_url %}<a id="older" href="{{ older_url }}">older →</a>{% endif %}</nav></section>
{{ rejected_section("Rejected requests", rejected, id="rejected") }}
{% endblock %}
""",

    "confirm.html": """{% extends "base.html" %}{% block main %}
<section id="confirm"><h1>{{ action|capitalize }} referral {{ referral.referral_id }}?</h1>
<p>Referral {{ referral.referral_id }} (referrer {{ referral.referrer_code }}) is {{ referral.state }}. It becomes
  <strong>{{ next_state }}</strong>: this is final and cannot be undone.</p>
<form method="post" class="row">{{ csrf_field() }}<input type="hidden" name="back" value="{{ back }}">
  <input type="hidden" name="confirmed" value="yes">
  <button id="confirm-action">Yes, {{ action }} referral</button> <a href="{{ back }}">Cancel</a></form></section>
{% endblock %}
""",

    "detail.html": """{% extends "base.html" %}{% block main %}
<p><a href="{{ tab_url(server) }}">← Referrals</a></p>
<h1>Event {{ row.id }}: {{ row.event }}</h1>
<section><table id="event-detail" class="wrap">
<tr><th>Received</th><td>{{ row.received }}</td></tr><tr><th>Outcome</th><td>{{ row.outcome }}</td></tr>
<tr><th>server_event_id</th><td>{{ row.server_event_id or "" }}</td></tr>
<tr><th>Referral</th><td>{{ referral.referral_id }} (referrer {{ referral.referrer_code }})</td></tr>
<tr><th>Referral state now</th><td id="referral-state">{{ referral.state }}</td></tr>
<tr><th>Referee</th><td>{{ referral.referee_identity or "" }}</td></tr></table>
{% if payload %}<h2>Stored payload (token masked)</h2><pre>{{ payload }}</pre>{% endif %}
</section>
<section><h2>Owner actions</h2>
{% for action in actions %}
<form method="get" class="inline"
      action="{{ server_url('owner_action_form', server, referral_id=referral.referral_id, action=action) }}">
  <input type="hidden" name="back" value="{{ server_url('log_detail', server, row_id=row.id) }}">
  <button class="plain" id="action-{{ action }}">{{ action|capitalize }} referral</button></form>
{% else %}
<p class="muted">None: a {{ referral.state }} referral is final or not yet registered.</p>
{% endfor %}
</section>
{% if referral.referee_identity and not referral.referee_identity.startswith("forgotten:") %}
<section><h2>Personal data</h2>
<form method="post" action="{{ server_url('forget_form', server, referral_id=referral.referral_id) }}">
  {{- csrf_field() }}<button class="plain" id="forget">Forget this player…</button></form></section>
{% endif %}
<section><h2>History of this referral</h2>
{% call(h) scroll_table(["Received", "Event", "Outcome", "server_event_id"], history, id="history",
                        data={"event": "event", "outcome": "outcome"}) %}
<td data-label="Received">{{ h.received }}</td><td data-label="Event">{{ h.event }}</td>
<td data-label="Outcome">{{ h.outcome }}</td><td data-label="server_event_id">{{ h.server_event_id or "" }}</td>
{% endcall %}
</section>
{% endblock %}
""",
}))
# url_for, the CSRF token and the dashboard's links serve every template and macro; the macros, every template
TEMPLATES.globals.update(url_for=url_for, csrf_token=csrf_token, iso_utc=iso_utc, server_url=_server_url,
                         tab_url=_tab_url)
_MACROS = TEMPLATES.get_template("macros.html").module
TEMPLATES.globals.update({name: getattr(_MACROS, name) for name in (
    "csrf_field", "scroll_table", "name_field", "select", "registration_fields", "rejected_section")})


# main ########################################################################

def main() -> None:
    """`python mmoref_server.py` and the installed `mmoref` (pyproject.toml): one CLI, named the way it was started."""
    global COMMAND
    COMMAND = command_started_as(__name__, __spec__, sys.argv[0])
    cli()


def command_started_as(module_name: str, spec: Any, program: str) -> str:
    """How the owner started mmoref, for the commands it tells them to run (the file's way under `flask --app`)."""
    if module_name != "__main__":
        return "mmoref" if Path(program).stem == "mmoref" else COMMAND
    return f"python -m {spec.name}" if spec is not None else COMMAND


if __name__ == "__main__":
    main()

"""What a webhook endpoint is sent: each format's body, headers and secrets. Pure: no I/O.

`standard` (the default) follows Standard Webhooks (standardwebhooks.com, spec
"Signature scheme"): the body is `{type, timestamp, session_id?, data}` and the headers
`webhook-id`, `webhook-timestamp` and `webhook-signature` (`v1,` + base64 HMAC-SHA256 of
`id.timestamp.body`, one per secret while they rotate). The spec's libraries base64-decode
every secret (after an optional `whsec_`), so a secret that is not base64 is refused
when the config is read rather than signing with a key no receiver can rebuild.

`agentctl` is exactly what agentctl's sender posts (OrgLoop/agentctl
src/daemon/webhook.ts, `WebhookPayload` and `emitWebhook`), for `session.stopped` only,
the one event it sends: `hook_type`, `session_id`, `cwd`, `adapter`, `duration_seconds`
(whole seconds, rounded as JavaScript's Math.round), `exit_status`, `summary`, `meta`
(the launch metadata: here the session's labels, flat), `timestamp`; signed with the
secret's text as `X-Agentctl-Signature` (hex HMAC-SHA256 of the body), `X-Signature` and
`X-Hub-Signature-256` (`sha256=` + the same). Its receivers compare one signature
exactly (OrgLoop's coding-agent and webhook connectors), so such an endpoint has one
secret. `webhook-id` is sent too, so a receiver can drop a repeat.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitor.store import Record

STANDARD = "standard"
AGENTCTL = "agentctl"
FORMATS = (STANDARD, AGENTCTL)
AGENTCTL_TYPES = frozenset({"session.stopped"})  # all that agentctl's sender ever posts
MAKE_SECRET = "python3 -c 'import base64, os; print(\"whsec_\" + base64.b64encode(os.urandom(24)).decode())'"


def iso_time(wall: float) -> str:
    """As JavaScript's Date.toISOString(): milliseconds, UTC, Z."""
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(data: dict[str, Any]) -> bytes:
    # As JSON.stringify writes it: no spaces, UTF-8 as it is.
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


# -- secrets -----------------------------------------------------------------------------


def standard_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: the base64 after an optional `whsec_`."""
    text = secret.removeprefix("whsec_")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def secret_problem(format_: str, secret: str) -> str | None:
    """Why `secret` cannot sign for `format_`, in words that say how to make one; None if it can."""
    if format_ != STANDARD:
        return None
    try:
        key = standard_key(secret)
    except (binascii.Error, ValueError):
        return (f"a Standard Webhooks secret is whsec_ followed by base64 (its receivers decode it): make one with {MAKE_SECRET}; "
                f"receivers written for agentctl use the secret's text: set format = \"{AGENTCTL}\" for them")
    if not key:
        return "the secret decodes to nothing"
    return None


# -- bodies ------------------------------------------------------------------------------


def body(format_: str, record: Record) -> bytes:
    return agentctl_body(record) if format_ == AGENTCTL else standard_body(record)


def standard_body(record: Record) -> bytes:
    """{type, timestamp, session_id (where the event has one), data: the event and its id}."""
    payload = record.payload
    data = {k: v for k, v in payload.items() if k != "type"}
    data["event_id"] = record.seq
    out: dict[str, Any] = {"type": record.type, "timestamp": iso_time(record.created_at)}
    if payload.get("session_id"):
        out["session_id"] = payload["session_id"]
    out["data"] = data
    return _json(out)


def js_round(x: float) -> int:
    """Math.round: halves go up (Python's round() goes to even)."""
    return math.floor(x + 0.5)


def shell_status(exit_code: int | None, signal: int | None) -> int | None:
    """As a shell reports it: the code, or 128 + the signal; None when nothing could tell."""
    return exit_code if exit_code is not None else 128 + signal if signal is not None else None


def agentctl_payload(record: Record) -> dict[str, Any]:
    """agentctl's WebhookPayload of a session.stopped event, its keys in agentctl's order."""
    payload = record.payload
    labels: dict[str, str] = payload.get("labels") or {}
    argv: list[str] = payload.get("argv") or []
    command = os.path.basename(argv[0]) if argv else "unknown"
    duration = payload.get("duration_s")
    return {
        "hook_type": "session.stopped",
        "session_id": payload.get("session_id"),
        "cwd": payload.get("cwd"),
        "adapter": labels.get("adapter") or command,  # agentctl always names one
        "duration_seconds": max(0, js_round(duration)) if duration is not None else 0,
        "exit_status": shell_status(payload.get("exit_code"), payload.get("signal")),
        "summary": (labels.get("summary") or " ".join(argv))[:200],
        "meta": dict(labels),
        "timestamp": iso_time(record.created_at),
    }


def agentctl_body(record: Record) -> bytes:
    return _json(agentctl_payload(record))


# -- headers -----------------------------------------------------------------------------


def headers(format_: str, secrets: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> list[tuple[str, str]]:
    """The signature headers of one attempt (`timestamp`: its wall time, whole seconds)."""
    secrets = list(secrets)
    if format_ == AGENTCTL:
        signature = hmac.new(secrets[0].encode(), body, hashlib.sha256).hexdigest()
        return [("webhook-id", msg_id), ("X-Agentctl-Signature", signature), ("X-Signature", "sha256=" + signature),
                ("X-Hub-Signature-256", "sha256=" + signature)]
    signed = f"{msg_id}.{timestamp}.".encode() + body
    signatures = " ".join("v1," + base64.b64encode(hmac.new(standard_key(s), signed, hashlib.sha256).digest()).decode()
                          for s in secrets)
    return [("webhook-id", msg_id), ("webhook-timestamp", str(timestamp)), ("webhook-signature", signatures)]

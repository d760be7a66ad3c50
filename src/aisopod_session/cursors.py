"""The cursors of `page_sessions`: opaque text that says where the next page starts and
which filter it belongs to, checked when given back (`ValueError` naming `cursor`).

A cursor is URL-safe base64 of a JSON list `[version, filter, updated_at, id]` after a
checksum of it: `filter` is a digest of the filter (and the repository's agent), so a
cursor is refused by a call with another filter; `updated_at` (the stored text) and `id`
are the last row of the page it came with. The checksum catches a cursor that was cut
or altered by accident; it is not a secret, and a forged cursor can do no more than start
a page elsewhere in the same filtered list.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

_VERSION = 1
_CHECK = 12  # hex digits of SHA-256 kept as the checksum
_MAX_LENGTH = 4096


def fingerprint(params: Mapping[str, Any]) -> str:
    """A digest of a filter's parameters in stored form (`repository.filter_params`)."""
    text = json.dumps(params, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def encode_cursor(filter_digest: str, updated_at: Any, row_id: int) -> str:
    """The cursor of the page that ends with the row (`updated_at` as stored, `row_id`)."""
    body = json.dumps(
        [_VERSION, filter_digest, str(updated_at), int(row_id)],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    check = hashlib.sha256(body.encode("utf-8")).hexdigest()[:_CHECK]
    return base64.urlsafe_b64encode(f"{check}{body}".encode()).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: Any, filter_digest: str) -> tuple[str, int]:
    """The `(updated_at, id)` of the row a cursor of this filter starts after; else
    `ValueError` naming `cursor`: not a string, damaged or altered, or from a page with
    another filter (or another agent's repository)."""
    if not isinstance(cursor, str):
        raise ValueError(
            f"cursor: must be a string from SessionPage.next_cursor, not {type(cursor).__name__}"
        )
    if not cursor or len(cursor) > _MAX_LENGTH or not cursor.isascii():
        raise ValueError("cursor: not a cursor given by page_sessions")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):
        raise ValueError("cursor: not a cursor given by page_sessions") from None
    check, body = raw[:_CHECK], raw[_CHECK:]
    if hashlib.sha256(body.encode("utf-8")).hexdigest()[:_CHECK] != check:
        raise ValueError("cursor: damaged or altered (its checksum does not match)")
    try:
        version, digest, updated_at, row_id = json.loads(body)
    except (ValueError, TypeError):
        raise ValueError("cursor: damaged or altered") from None
    if version != _VERSION or not isinstance(updated_at, str) or type(row_id) is not int:
        raise ValueError("cursor: not a cursor of this version of aisopod-session")
    if not -(2**63) <= row_id < 2**63 or "\x00" in updated_at or len(updated_at) > 64:
        raise ValueError("cursor: damaged or altered (its values are out of range)")
    if digest != filter_digest:
        raise ValueError(
            "cursor: it belongs to a page with another filter (or another agent's view); "
            "pass the same filter as the page it came with"
        )
    return updated_at, row_id

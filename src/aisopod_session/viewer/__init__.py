"""The read-only web viewer behind `aisopod-session serve` (needs the `viewer` extra:
FastAPI, Jinja2 and uvicorn). `create_app` builds the ASGI app; see docs/viewer.md."""

from __future__ import annotations

from aisopod_session.viewer.app import create_app, is_loopback

__all__ = ["create_app", "is_loopback"]

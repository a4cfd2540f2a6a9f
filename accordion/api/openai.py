"""OpenAI-compatible routes under /v1 (filled in by the OpenAI routes work)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()

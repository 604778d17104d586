"""A request that gets an error reply: its HTTP status, a short code and what is wrong."""
from __future__ import annotations


class ServeError(Exception):
    """Becomes ``{"error": code, "detail": detail}`` with ``status``; the server goes on."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail

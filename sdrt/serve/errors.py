"""The HTTP layer's error: a status code, a one-line message and its kind, answered as JSON by the app."""

from __future__ import annotations


class ServiceError(Exception):
    def __init__(self, status: int, message: str, kind: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}

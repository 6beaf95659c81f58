"""Errors that carry the HTTP status and the plain-text message Consul would answer with."""

from __future__ import annotations


class APIError(Exception):
    """An error the HTTP layer turns into `status` with `message` as a text/plain body."""

    status = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(APIError):
    status = 400


class NotFound(APIError):
    status = 404


class PayloadTooLarge(APIError):
    status = 413


class NoLeader(APIError):
    """Consul's answer when no quorum can commit a write or confirm a read."""

    status = 500

    def __init__(self, message: str = "No cluster leader") -> None:
        super().__init__(message)

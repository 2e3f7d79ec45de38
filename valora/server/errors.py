"""Errors as OpenAI returns them: `{"error": {"message", "type", "code", "param"}}` with the matching status.

Every failure a client can cause becomes an `APIError` with a status and a short machine-readable `code`;
the server keeps serving everything else.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_overloaded",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "code": self.code, "param": self.param}}

    def response(self, close: bool = False) -> JSONResponse:
        """`close`: answered before the request body was read, so the connection is closed instead of drained."""
        headers = {**(self.headers or {}), **({"Connection": "close"} if close else {})}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> APIError:
    return APIError(400, message, code, param)


def adapter_load_failed(name: str, error: Exception, param: str, where: str = "") -> APIError:
    """400 for an adapter that could not be loaded; the reason without the adapter's name said a second time."""
    reason = str(error).removeprefix(f"adapter {name!r}: ")
    return APIError(400, f"failed to load adapter {name!r}{where}: {reason}", "adapter_load_failed", param)


def not_found(message: str, code: str, param: str | None = None) -> APIError:
    return APIError(404, message, code, param)

"""Remote media, opt-in: http(s) URLs whose host is on the operator's allow-list (`--allowed-media-domains`),
fetched with bounded time and bytes.

Every hop of a redirect is checked against the allow-list before it is followed (httpx follows none on its own), a
declared `Content-Length` over the cap is refused before the body is read, and the body stops at the cap. The time
limit covers the whole fetch (connect, redirects, every byte), so a server that trickles bytes cannot hold a worker.
"""

from __future__ import annotations

import time
from urllib.parse import urljoin, urlsplit

from valora.multimodal.inputs import InputError

_REDIRECTS = (301, 302, 303, 307, 308)


class RemoteMedia:
    def __init__(self, allowed_domains, timeout_s: float = 10.0, connect_timeout_s: float = 5.0,
                 max_redirects: int = 5) -> None:
        import httpx

        self.allowed = frozenset(d.lower().rstrip(".") for d in allowed_domains)
        self.timeout_s, self.max_redirects = timeout_s, max_redirects
        # One pooled client for every request thread (httpx clients are thread-safe); no environment proxies.
        self.client = httpx.Client(follow_redirects=False, trust_env=False,
                                   timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s))

    def check(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise InputError(f"media URL scheme {parts.scheme!r} is not fetched (http and https are)")
        host = (parts.hostname or "").rstrip(".")
        if host not in self.allowed:
            raise InputError(f"media host {host!r} is not in --allowed-media-domains")

    def fetch(self, url: str, max_bytes: int) -> bytes:
        """The body of `url` (after allowed redirects), at most `max_bytes`, within the time limit."""
        import httpx

        deadline = time.monotonic() + self.timeout_s
        try:
            for _ in range(self.max_redirects + 1):
                self.check(url)
                with self.client.stream("GET", url) as response:
                    if response.status_code in _REDIRECTS and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise InputError(f"fetching {url} gave HTTP {response.status_code}")
                    return self._body(response, url, max_bytes, deadline)
            raise InputError(f"fetching media: more than {self.max_redirects} redirects")
        except httpx.TimeoutException as e:
            raise InputError(f"fetching {url} timed out ({type(e).__name__})") from e
        except httpx.HTTPError as e:
            raise InputError(f"cannot fetch {url}: {e}") from e

    def _body(self, response, url: str, max_bytes: int, deadline: float) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise InputError(f"{url} is {declared} bytes, over the limit of {max_bytes}")
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise InputError(f"{url} is over the limit of {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise InputError(f"fetching {url} took over {self.timeout_s:g} s")
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.client.close()

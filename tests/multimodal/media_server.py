"""A local HTTP server for remote-media tests: `http.server` in a thread, serving fixed routes, redirects, bodies
over a cap (declared and undeclared) and a body that trickles."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class MediaServer:
    """`files` maps paths to bodies; `redirects` maps paths to Location values; `/trickle` sends a byte every
    0.2 s for a minute; `/undeclared/<n>` sends n bytes without a Content-Length."""

    def __init__(self, files: dict[str, bytes], redirects: dict[str, str] | None = None) -> None:
        self.files, self.redirects = files, redirects or {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.end_headers()
                elif self.path in server.files:
                    body = server.files[self.path]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path.startswith("/undeclared/"):
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(b"x" * int(self.path.rsplit("/", 1)[1]))
                elif self.path == "/trickle":
                    self.send_response(200)
                    self.end_headers()
                    try:
                        for _ in range(300):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.2)
                    except OSError:
                        pass
                else:
                    self.send_error(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def __enter__(self) -> MediaServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

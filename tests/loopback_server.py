"""A threaded HTTP server on a free 127.0.0.1 port, for tests that fake SGLang's."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    #: socketserver listens with a backlog of 5: a burst of connections from more clients
    #: (the soak drives 16) overflows it on a busy machine and a connection is reset
    #: before the server ever sees it. A real server listens with a deep backlog.
    request_queue_size = 256


class LoopbackServer:
    """ThreadingHTTPServer on a free 127.0.0.1 port, serving in a daemon thread."""

    def __init__(self, handler):
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

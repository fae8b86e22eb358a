"""A loopback HTTP server that answers like the Hugging Face Hub does for gated and missing repositories."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _HubHandler(BaseHTTPRequestHandler):
    def _answer(self):
        if "/gated-org/" in self.path:
            status, code, message = 403, "GatedRepo", "Access to model gated-org/model is restricted."
        else:
            status, code, message = 404, "RepoNotFound", "Repository not found."
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *args):
        pass


class FakeHub:
    def __enter__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

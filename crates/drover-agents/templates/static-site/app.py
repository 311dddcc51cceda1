"""Static Site: serves the files in ./public over HTTP, scaffolded by drover.

Run it with `PORT=8000 python3 app.py`; `GET /health` answers JSON for probes.
"""

import json
import os
import signal
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

PUBLIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "public")


class Handler(SimpleHTTPRequestHandler):
    server_version = "static-site/1.0"

    def do_GET(self):
        if self.path == "/health":
            data = json.dumps({"status": "ok"}).encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        super().do_GET()

    def log_message(self, format, *args):
        sys.stderr.write("%s %s\n" % (self.address_string(), format % args))


def make_server(port, host="127.0.0.1", directory=PUBLIC):
    return ThreadingHTTPServer((host, port), partial(Handler, directory=directory))


def main():
    port = int(os.environ.get("PORT", "8000"))
    host = os.environ.get("HOST", "127.0.0.1")
    server = make_server(port, host)

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("listening on http://%s:%d" % (host, server.server_address[1]), flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()

"""Todo API: an in-memory JSON HTTP service for a todo list, scaffolded by drover.

Run it with `PORT=8000 python3 app.py`.

    GET    /            service description
    GET    /health      liveness
    GET    /todos       list todos
    POST   /todos       create a todo from {"title": "..."}
    GET    /todos/<id>  one todo
    PATCH  /todos/<id>  update {"title": "...", "done": true}
    DELETE /todos/<id>  delete a todo
"""

import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class TodoStore:
    """Todos in memory, safe to use from the server's threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._todos = {}
        self._next_id = 1

    def list(self):
        with self._lock:
            return [dict(todo) for todo in self._todos.values()]

    def create(self, title):
        with self._lock:
            todo = {"id": self._next_id, "title": title, "done": False}
            self._todos[todo["id"]] = todo
            self._next_id += 1
            return dict(todo)

    def get(self, todo_id):
        with self._lock:
            todo = self._todos.get(todo_id)
            return dict(todo) if todo else None

    def update(self, todo_id, changes):
        with self._lock:
            todo = self._todos.get(todo_id)
            if todo is None:
                return None
            todo.update(changes)
            return dict(todo)

    def delete(self, todo_id):
        with self._lock:
            return self._todos.pop(todo_id, None) is not None


def make_handler(store):
    class Handler(BaseHTTPRequestHandler):
        server_version = "todo-api/1.0"

        def do_GET(self):
            if self.path == "/":
                self.send_json(200, {
                    "message": "Hello, World! This is the Todo API",
                    "service": "todo-api",
                    "endpoints": ["/health", "/todos", "/todos/<id>"],
                })
            elif self.path == "/health":
                self.send_json(200, {"status": "ok"})
            elif self.path == "/todos":
                self.send_json(200, store.list())
            else:
                todo_id = self.todo_id()
                todo = store.get(todo_id) if todo_id is not None else None
                if todo is None:
                    self.send_json(404, {"error": "not found", "path": self.path})
                else:
                    self.send_json(200, todo)

        def do_POST(self):
            if self.path != "/todos":
                self.send_json(404, {"error": "not found", "path": self.path})
                return
            body = self.read_json()
            if body is None:
                return
            title = body.get("title") if isinstance(body, dict) else None
            if not isinstance(title, str) or not title.strip():
                self.send_json(422, {"error": "title must be a non-empty string"})
                return
            self.send_json(201, store.create(title.strip()))

        def do_PATCH(self):
            todo_id = self.todo_id()
            body = self.read_json()
            if body is None:
                return
            if not isinstance(body, dict):
                self.send_json(422, {"error": "body must be an object"})
                return
            changes = {}
            if "title" in body:
                if not isinstance(body["title"], str) or not body["title"].strip():
                    self.send_json(422, {"error": "title must be a non-empty string"})
                    return
                changes["title"] = body["title"].strip()
            if "done" in body:
                if not isinstance(body["done"], bool):
                    self.send_json(422, {"error": "done must be a boolean"})
                    return
                changes["done"] = body["done"]
            todo = store.update(todo_id, changes) if todo_id is not None else None
            if todo is None:
                self.send_json(404, {"error": "not found", "path": self.path})
            else:
                self.send_json(200, todo)

        def do_DELETE(self):
            todo_id = self.todo_id()
            if todo_id is not None and store.delete(todo_id):
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_json(404, {"error": "not found", "path": self.path})

        def todo_id(self):
            prefix = "/todos/"
            if not self.path.startswith(prefix):
                return None
            try:
                return int(self.path[len(prefix):])
            except ValueError:
                return None

        def read_json(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length > 64 * 1024:
                self.send_json(413, {"error": "body too large"})
                return None
            try:
                return json.loads(self.rfile.read(length) or b"null")
            except ValueError:
                self.send_json(400, {"error": "body is not valid JSON"})
                return None

        def send_json(self, status, body):
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):
            sys.stderr.write("%s %s\n" % (self.address_string(), format % args))

    return Handler


def make_server(port, host="127.0.0.1"):
    return ThreadingHTTPServer((host, port), make_handler(TodoStore()))


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

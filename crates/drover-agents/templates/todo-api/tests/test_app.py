"""Tests for the Todo API, run against a real server on a free port."""

import json
import os
import sys
import threading
import unittest
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import app  # noqa: E402


class TodoApiTest(unittest.TestCase):
    def setUp(self):
        self.server = app.make_server(0)
        self.base = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def tearDown(self):
        self.server.shutdown()
        self.server.server_close()

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as error:
            raw = error.read()
            return error.code, json.loads(raw) if raw else None

    def test_root_describes_the_service(self):
        status, body = self.call("GET", "/")
        self.assertEqual(status, 200)
        self.assertIn("Todo API", body["message"])

    def test_health_is_ok(self):
        self.assertEqual(self.call("GET", "/health"), (200, {"status": "ok"}))

    def test_todos_can_be_created_listed_updated_and_deleted(self):
        self.assertEqual(self.call("GET", "/todos"), (200, []))
        status, todo = self.call("POST", "/todos", {"title": "write tests"})
        self.assertEqual(status, 201)
        self.assertEqual(todo, {"id": 1, "title": "write tests", "done": False})
        status, todo = self.call("PATCH", "/todos/1", {"done": True})
        self.assertEqual((status, todo["done"]), (200, True))
        self.assertEqual(self.call("GET", "/todos")[1], [todo])
        self.assertEqual(self.call("DELETE", "/todos/1")[0], 204)
        self.assertEqual(self.call("GET", "/todos/1")[0], 404)

    def test_a_blank_title_is_rejected(self):
        status, body = self.call("POST", "/todos", {"title": "  "})
        self.assertEqual(status, 422)
        self.assertIn("title", body["error"])


if __name__ == "__main__":
    unittest.main()

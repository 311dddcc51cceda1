"""Tests for the static site, run against a real server on a free port."""

import json
import os
import sys
import threading
import unittest
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import app  # noqa: E402


class StaticSiteTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = app.make_server(0)
        cls.base = "http://127.0.0.1:%d" % cls.server.server_address[1]
        threading.Thread(target=cls.server.serve_forever, daemon=True).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()

    def fetch(self, path):
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as response:
                return response.status, response.headers.get("Content-Type"), response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("Content-Type"), error.read()

    def test_index_page_is_served(self):
        status, content_type, body = self.fetch("/")
        self.assertEqual(status, 200)
        self.assertIn("text/html", content_type)
        self.assertIn(b"<h1>Hello, World!</h1>", body)

    def test_stylesheet_is_served(self):
        status, content_type, _ = self.fetch("/style.css")
        self.assertEqual((status, content_type), (200, "text/css"))

    def test_health_is_json(self):
        status, _, body = self.fetch("/health")
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))

    def test_missing_file_is_404(self):
        self.assertEqual(self.fetch("/missing.html")[0], 404)


if __name__ == "__main__":
    unittest.main()

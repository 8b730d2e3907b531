"""Ray token authentication (Ray >= 2.52) for the Jobs API and Serve REST calls: where the token comes from."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from anneal.runtime.jobs_api import JobsApiClient, JobsApiError, ray_auth_headers


@pytest.fixture
def clean(monkeypatch, tmp_path):
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_no_token_no_header(clean):
    assert ray_auth_headers() == {}


def test_token_sources_in_rays_order(clean, monkeypatch):
    (clean / ".ray").mkdir()
    (clean / ".ray" / "auth_token").write_text("from-default\n")
    assert ray_auth_headers() == {"Authorization": "Bearer from-default"}
    path = clean / "token"
    path.write_text("from-path\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert ray_auth_headers() == {"Authorization": "Bearer from-path"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert ray_auth_headers() == {"Authorization": "Bearer from-env"}


def test_a_named_token_file_must_be_readable_and_non_empty(clean, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(clean / "missing"))
    with pytest.raises(JobsApiError, match="cannot read the Ray token") as info:
        ray_auth_headers()
    assert not info.value.transient
    (clean / "empty").write_text("\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(clean / "empty"))
    with pytest.raises(JobsApiError, match="empty"):
        ray_auth_headers()


def test_jobs_client_sends_the_token(clean, monkeypatch):
    """Against a real HTTP server on loopback that records what it was sent."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            body = json.dumps({"submission_id": "s1", "status": "RUNNING"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret")
        with JobsApiClient(f"http://127.0.0.1:{server.server_address[1]}") as c:
            assert c.get("s1").status == "RUNNING"
        monkeypatch.delenv("RAY_AUTH_TOKEN")
        with JobsApiClient(f"http://127.0.0.1:{server.server_address[1]}") as c:
            c.get("s1")
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["Bearer s3cret", None]

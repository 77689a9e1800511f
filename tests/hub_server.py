"""A fake Hugging Face Hub on 127.0.0.1 for tests: the real huggingface_hub client downloads from it.

It serves what `hf_hub_download` (huggingface_hub 2.4) asks for: HEAD and GET of
`/{repo_id}/resolve/{revision}/{filename}` with the headers the client requires (`ETag`, `X-Repo-Commit`
with a 40-hex commit, `Content-Length`), `Range` requests (the client resumes partial downloads with
them), and 404s typed by `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) so that the
client raises `RepositoryNotFoundError`, `RevisionNotFoundError` and `RemoteEntryNotFoundError`.

Repos are a dict `{repo_id: {revision: {filename: bytes}}}`; a revision is a branch name such as "main"
and gets a fixed commit hash, which also resolves. Every request is recorded in `FakeHub.requests`, and
any request outside these routes in `FakeHub.unhandled`, so a test can show the client asked for nothing
else. Point the client at it with `HF_ENDPOINT=hub.endpoint`, set before huggingface_hub is imported
(it reads the variable at import time), which is why the download tests run their Python in subprocesses.
"""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# /{org}/{name}/resolve/{revision}/{path}; models only (datasets and spaces have a /datasets/ prefix).
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")
_RANGE = re.compile(r"^bytes=(?P<start>\d+)-(?P<end>\d*)$")


def commit_hash(repo_id: str, revision: str) -> str:
    """The fixed 40-hex commit a branch of a fake repo points at."""
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


class FakeHub:
    """A loopback Hub serving `repos` ({repo_id: {revision: {filename: bytes}}}) on an ephemeral port."""

    def __init__(self, repos: dict[str, dict[str, dict[str, bytes]]]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def commit(self, repo_id: str, revision: str = "main") -> str:
        return commit_hash(repo_id, revision)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def resolve(self, repo_id: str, revision: str, filename: str) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body for one resolve request, as the real Hub answers it."""
        branches = self.repos.get(repo_id)
        if branches is None:
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""
        by_commit = {commit_hash(repo_id, branch): branch for branch in branches}
        branch = by_commit.get(revision, revision)
        files = branches.get(branch)
        if files is None:
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b""
        commit = commit_hash(repo_id, branch)
        if filename not in files:
            headers = {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": commit}
            return 404, headers, b""
        body = files[filename]
        # The real Hub's ETag of an LFS file is its sha256; the client names the cached blob after it.
        headers = {"ETag": f'"{hashlib.sha256(body).hexdigest()}"', "X-Repo-Commit": commit}
        return 200, headers, body


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - the base class names it so
            # Quiet: tests read `hub.requests` instead of stderr.
            return

        def _answer(self, send_body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            match = _RESOLVE.match(path)
            if match is None:
                hub.unhandled.append((self.command, path))
                status, headers, body = 404, {"X-Error-Message": "Not served by the fake Hub"}, b""
            else:
                status, headers, body = hub.resolve(match["repo"], match["revision"], match["filename"])
            range_match = _RANGE.match(self.headers.get("Range", ""))
            if status == 200 and range_match is not None:
                start = int(range_match["start"])
                end = int(range_match["end"]) if range_match["end"] else len(body) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
                status, body = 206, body[start : end + 1]
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def do_HEAD(self):  # noqa: N802 - http.server's naming
            self._answer(send_body=False)

        def do_GET(self):  # noqa: N802 - http.server's naming
            self._answer(send_body=True)

    return Handler

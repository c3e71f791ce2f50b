"""A local stand-in for the Hugging Face hub: enough of its HTTP protocol for the installed huggingface_hub.

Serves model directories (built with toymodels) as repositories with named revisions: the model info
API (`/api/models/{repo}[/revision/{rev}]`), the tree API (`/api/models/{repo}/tree/{rev}`) and file
resolution (`/{repo}/resolve/{rev}/{path}`, HEAD and GET with Range), and for uploads `whoami-v2`,
`repos/create`, `preupload` and `commit` (every file sent inline, base64, as "regular" files). Unknown repos, revisions and
files answer 404 with the `X-Error-Code` huggingface_hub turns into its typed errors. Every request is
recorded (method, path, range, body bytes sent) so tests can assert what was fetched.

Use the `hub` fixture: it starts a server on 127.0.0.1 in a thread, points huggingface_hub at it
(HF_ENDPOINT and the constants read from it at import time), gives it an empty cache and no token, and
stops the server at teardown.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

API = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree|preupload|commit)/(?P<rev>[^/]+)(?P<sub>/.*)?)?$"
)
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    sent: int  # body bytes sent


@dataclass(frozen=True)
class Revision:
    name: str
    sha: str
    directory: Path

    def files(self) -> dict[str, Path]:
        return {p.relative_to(self.directory).as_posix(): p for p in sorted(self.directory.rglob("*")) if p.is_file()}


class FakeHub:
    def __init__(self, root: Path) -> None:
        self.root = root  # where uploaded repositories are written
        self.repos: dict[str, dict[str, Revision]] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, repo: str, directory: Path, revision: str = "main") -> str:
        """Serve `directory` as `repo` at branch `revision`; returns the revision's commit sha."""
        sha = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
        self.repos.setdefault(repo, {})[revision] = Revision(revision, sha, Path(directory))
        return sha

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # What tests ask about the traffic
    def fetched(self) -> list[str]:
        """Paths of files whose bytes were sent (GET on resolve), in order, without repeats."""
        out: list[str] = []
        for r in self.requests:
            m = RESOLVE.match(r.path)
            if r.method == "GET" and m and m["path"] not in out:
                out.append(m["path"])
        return out

    def bytes_sent(self) -> int:
        return sum(r.sent for r in self.requests)

    def find(self, repo: str, rev: str) -> Revision | None:
        revisions = self.repos.get(repo, {})
        return revisions.get(rev) or next((r for r in revisions.values() if r.sha == rev), None)


def _etag(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(head=True)

        def do_GET(self) -> None:  # noqa: N802
            if urlsplit(self.path).path == "/api/whoami-v2":
                return self._send(200, json.dumps({"name": "me", "type": "user"}).encode(), {}, False)
            self._answer(head=False)

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = unquote(urlsplit(self.path).path)
            answer: object = {}
            if path == "/api/repos/create":
                data = json.loads(body)
                repo = f"{data['organization']}/{data['name']}"
                if repo not in hub.repos:
                    (hub.root / repo).mkdir(parents=True, exist_ok=True)
                    hub.add(repo, hub.root / repo)
                answer = {"url": f"{hub.url}/{repo}"}
            elif (m := API.match(path)) and m["kind"] in ("preupload", "commit"):
                rev = hub.find(m["repo"], m["rev"])
                if rev is None:
                    return self._error("RepoNotFound" if m["repo"] not in hub.repos else "RevisionNotFound", False)
                if m["kind"] == "preupload":
                    files = json.loads(body)["files"]
                    answer = {
                        "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    }
                else:
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            target = rev.directory / item["value"]["path"]
                            target.parent.mkdir(parents=True, exist_ok=True)
                            target.write_bytes(base64.b64decode(item["value"]["content"]))
                    answer = {"commitUrl": f"{hub.url}/{m['repo']}/commit/{rev.sha}", "commitOid": rev.sha}
            elif path != "/api/validate-yaml":
                return self._error("RepoNotFound", False)
            self._send(200, json.dumps(answer).encode(), {"Content-Type": "application/json"}, False)

        def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            path = unquote(urlsplit(self.path).path)
            with hub._lock:
                hub.requests.append(Request(self.command, path, self.headers.get("Range"), 0 if head else len(body)))

        def _error(self, code: str, head: bool) -> None:
            body = json.dumps({"error": code}).encode()
            self._send(404, body, {"X-Error-Code": code, "Content-Type": "application/json"}, head)

        def _answer(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            m = API.match(path) or RESOLVE.match(path)
            if m is None or m["repo"] not in hub.repos:
                return self._error("RepoNotFound", head)
            rev = hub.find(m["repo"], m.groupdict().get("rev") or "main")
            if rev is None:
                return self._error("RevisionNotFound", head)
            files = rev.files()
            if m.re is API:
                if m["kind"] == "tree":
                    sub = (m["sub"] or "").strip("/")
                    entries = [
                        {"type": "file", "path": name, "size": p.stat().st_size, "oid": _etag(p)[:40]}
                        for name, p in files.items()
                        if not sub or name.startswith(sub + "/")
                    ]
                    body = json.dumps(entries).encode()
                else:
                    info = {
                        "id": m["repo"],
                        "sha": rev.sha,
                        "private": False,
                        "siblings": [{"rfilename": name} for name in files],
                    }
                    body = json.dumps(info).encode()
                return self._send(200, body, {"Content-Type": "application/json"}, head)
            file = files.get(m["path"])
            if file is None:
                return self._error("EntryNotFound", head)
            data = file.read_bytes()
            headers = {
                "ETag": f'"{_etag(file)}"',
                "X-Repo-Commit": rev.sha,
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            status, body = 200, data
            wanted = self.headers.get("Range")
            if wanted and not head:
                r = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
                if r:
                    start = int(r[1])
                    end = min(int(r[2]) if r[2] else len(data) - 1, len(data) - 1)
                    status, body = 206, data[start : end + 1]
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            if head:
                headers["Content-Length"] = str(len(data))
            self._send(status, body, headers, head)

    return Handler


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running FakeHub that huggingface_hub talks to, with an empty cache under tmp_path and no token."""
    from huggingface_hub import constants

    server = FakeHub(tmp_path / "fakehub")
    server.start()
    home = tmp_path / "hf_home"
    cache = home / "hub"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    # huggingface_hub reads these at import time
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    try:
        yield server
    finally:
        server.stop()

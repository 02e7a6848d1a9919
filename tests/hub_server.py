"""A Hub-compatible HTTP server on 127.0.0.1 for tests: the endpoints huggingface_hub 2.x uses to create a model repo,
upload a folder (preupload, LFS batch + basic transfer, ndjson commit), read repo info and the file tree, and download files.

Hand-written because no installable local Hub server accepts uploads. Repos live in memory; LFS is chosen for weights and
images as the Hub's default .gitattributes does. Every Authorization header is recorded so tests can check the token's use.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

USER = "medfm-user"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".tar.gz", ".png", ".jpg")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)
    commits: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


class LocalHub:
    """`with LocalHub(token) as hub:` serves at `hub.endpoint`; `hub.repos`, `hub.authorizations` hold what it received."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.authorizations: list[str | None] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def add_files(self, repo_id: str, files: dict[str, bytes]) -> None:
        """Commit `files` to the public model repo `repo_id` (made if new), as if pushed: a package's weights for a test to download."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private=False))
            repo.files.update(files)
            repo.lfs.update(path for path in files if path.endswith(LFS_SUFFIXES))
            repo.commits.append(hashlib.sha1((repo_id + repo.sha + "".join(sorted(map(git_blob_sha1, files.values())))).encode()).hexdigest())

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # ------------------------------------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None) -> None:
        if body is None:
            body = json.dumps(payload).encode() if payload is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if payload is not None else "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, headers: dict | None = None) -> None:
        self._send(status, {"error": message}, headers={"X-Error-Message": message, **(headers or {})})

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _readable(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        return repo if repo is not None and (not repo.private or self._authorized()) else None

    def _route(self) -> None:
        self.hub.authorizations.append(self.headers.get("Authorization"))
        path = unquote(urlsplit(self.path).path)
        for method, pattern, handler in ROUTES:
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                return handler(self, *match.groups())
        self._error(404, f"No route for {self.command} {path}")

    do_GET = do_POST = do_PUT = do_HEAD = _route

    # ------------------------------------------------------------------------------------------------ write side
    def create_repo(self) -> None:
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        payload = json.loads(self._body())
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.hub.endpoint}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            self.hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self) -> None:
        content = json.loads(self._body())["content"]
        header = content.split("---")[1] if content.startswith("---") else ""
        try:
            yaml.safe_load(header)
        except yaml.YAMLError as err:
            return self._send(400, {"errors": [{"message": str(err)}], "warnings": []})
        self._send(200, {"errors": [], "warnings": []})

    def _writable(self, repo_id: str) -> Repo | None:
        if not self._authorized():
            self._error(401, "Invalid credentials in Authorization header")
            return None
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        return repo

    def preupload(self, repo_id: str, revision: str) -> None:
        if self._writable(repo_id) is None:
            return
        files = json.loads(self._body())["files"]
        self._send(200, {"files": [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                                    "shouldIgnore": False, "oid": None} for f in files]})

    def lfs_batch(self, repo_id: str) -> None:
        if self._writable(repo_id) is None:
            return
        objects = json.loads(self._body())["objects"]
        self._send(200, {"transfer": "basic", "objects": [
            {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"{self.hub.endpoint}/lfs-upload/{o['oid']}", "header": {}}}}
            for o in objects]})

    def lfs_upload(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "sha256 of the uploaded object does not match its oid")
        self.hub.lfs_objects[oid] = data
        self._send(200, {})

    def commit(self, repo_id: str, revision: str) -> None:
        repo = self._writable(repo_id)
        if repo is None:
            return
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        with self.hub.lock:
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    repo.files[value["path"]] = base64.b64decode(value["content"])
                    repo.lfs.discard(value["path"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in self.hub.lfs_objects:
                        return self._error(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    repo.files[value["path"]] = self.hub.lfs_objects[value["oid"]]
                    repo.lfs.add(value["path"])
                elif line["key"] == "deletedFile":
                    repo.files.pop(value["path"], None)
            repo.commits.append(hashlib.sha1(json.dumps(lines).encode() + repo.sha.encode()).hexdigest())
        self._send(200, {"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{repo.sha}", "commitOid": repo.sha, "pullRequestUrl": None})

    # ------------------------------------------------------------------------------------------------ read side
    def _repo_at(self, repo_id: str, revision: str | None) -> Repo | None:
        repo = self._readable(repo_id)
        if repo is None:
            self._error(404 if self._authorized() else 401, "Repository not found", {"X-Error-Code": "RepoNotFound"})
            return None
        if revision not in (None, "main", repo.sha):
            self._error(404, f"Invalid rev id: {revision}", {"X-Error-Code": "RevisionNotFound"})
            return None
        return repo

    def model_info(self, repo_id: str, revision: str | None = None) -> None:
        repo = self._repo_at(repo_id, revision)
        if repo is not None:
            self._send(200, {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": repo.private,
                             "siblings": [{"rfilename": path} for path in sorted(repo.files)]})

    def tree(self, repo_id: str, revision: str) -> None:
        repo = self._repo_at(repo_id, revision)
        if repo is None:
            return
        entries = []
        for path, data in sorted(repo.files.items()):
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            if path in repo.lfs:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._send(200, entries)

    def resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo_at(repo_id, revision)
        if repo is None:
            return
        if path not in repo.files:
            return self._error(404, "Entry not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha})
        data = repo.files[path]
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{git_blob_sha1(data)}"'}
        if path in repo.lfs:
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        self._send(200, headers=headers, body=data)


_REPO = r"/((?:[\w.-]+/)?[\w.-]+)"  # owner/name, or a bare legacy name such as bert-base-uncased
ROUTES = [
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", rf"/api/models{_REPO}/preupload/([^/]+)", _Handler.preupload),
    ("POST", rf"{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/lfs-upload/([0-9a-f]{64})", _Handler.lfs_upload),
    ("POST", rf"/api/models{_REPO}/commit/([^/]+)", _Handler.commit),
    ("GET", rf"/api/models{_REPO}", _Handler.model_info),
    ("GET", rf"/api/models{_REPO}/revision/([^/]+)", _Handler.model_info),
    ("GET", rf"/api/models{_REPO}/tree/([^/]+)", _Handler.tree),
    ("HEAD", rf"{_REPO}/resolve/([^/]+)/(.+)", _Handler.resolve),
    ("GET", rf"{_REPO}/resolve/([^/]+)/(.+)", _Handler.resolve),
]

"""A loopback HTTP server that answers like the Hugging Face Hub, for the tests.

Repos it does not hold keep the canned download answers: any path containing "/gated-org/" is 403 GatedRepo, any other
unknown repo or route is 404 RepoNotFound (with the X-Error-Code / X-Error-Message headers the Hub sends).

On top of that it is an in-memory Hub of model repos, enough for huggingface_hub 2.4's upload and download paths:

    GET  /api/whoami-v2                                  name, orgs, auth.accessToken.role ("read" or "write")
    POST /api/validate-yaml                              README.md metadata check (always valid)
    POST /api/repos/create                               {"name", "organization", "visibility"}; 409 if it exists
    GET  /api/models/{repo}[/revision/{rev}]             model_info / repo_info: sha, private, siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]          list_repo_tree / list_repo_files (?recursive=true)
    POST /api/models/{repo}/preupload/{rev}              uploadMode "regular" or "lfs" per file, oid if stored
    POST /api/models/{repo}/commit/{rev}                 NDJSON: header, file (base64), lfsFile, deletedFile/Folder
    POST /{repo}.git/info/lfs/objects/batch              LFS batch API, "basic" transfer, upload href on this server
    PUT  /lfs-upload/{ticket}                            the object's bytes (sha256 and size checked)
    POST /{repo}.git/info/lfs/objects/verify             {"oid", "size"}: 200 once the object is stored
    GET|HEAD /{repo}/resolve/{rev}/{path}                hf_hub_download: ETag, X-Repo-Commit, Content-Length, and
                                                         X-Linked-Etag / X-Linked-Size for LFS files
    GET  /api/models/{repo}/xet-{read,write}-token/{rev} 400: this server has no Xet storage

Xet: huggingface_hub 2.4 sends each file that preupload calls "lfs" through Xet whenever hf_xet is installed, unless
HF_HUB_DISABLE_XET=1 (read at import into huggingface_hub.constants); no server answer turns that off. So by default
(lfs=False) preupload answers "regular" for every file and the commit carries the bytes, which works for a client on
default settings. FakeHub(lfs=True) decides like the Hub (LFS suffixes, binary content, >= 10 MB) and needs the client
to run with HF_HUB_DISABLE_XET=1. Downloads never use Xet: resolve answers carry no X-Xet-Hash header.

Auth: "Authorization: Bearer <token>", looked up in `tokens` ({token: (user, role)}). A write needs a known token (401),
role "write" and the user's own namespace (403). A private repo is 404 RepoNotFound to anyone but its owner. A read with
an unknown token is anonymous, as the download tests' fake HF_TOKEN needs. Only the "main" branch (and its commit
shas) exists; a new repo has one empty commit (no .gitattributes).
"""

import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_TOKENS = {"hf_write": ("alice", "write"), "hf_read": ("alice", "read")}
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024


class HubError(Exception):
    def __init__(self, status, message, code=None, headers=None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()


@dataclass
class Repo:
    owner: str
    private: bool
    created: str = field(default_factory=_now)
    commits: list = field(default_factory=list)  # [(oid, summary, {path: (bytes, is_lfs)})], oldest first
    lfs_objects: dict = field(default_factory=dict)  # sha256 -> bytes, uploaded but maybe not committed yet

    @property
    def files(self) -> dict[str, bytes]:
        return {path: data for path, (data, _) in self.commits[-1][2].items()}

    @property
    def lfs_files(self) -> set[str]:
        return {path for path, (_, lfs) in self.commits[-1][2].items() if lfs}

    def commit(self, summary, tree):
        oid = hashlib.sha1(f"{len(self.commits)} {summary} {time.time_ns()}".encode()).hexdigest()
        self.commits.append((oid, summary, tree))
        return oid

    def snapshot(self, revision):
        for oid, _, tree in reversed(self.commits):
            if revision in ("main", oid):
                return oid, tree
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class FakeHub:
    """`with FakeHub(tokens={token: (user, role)}, lfs=False) as hub:` serves on `hub.url`; `hub.repos[repo_id]`
    (`.private`, `.files`, `.lfs_files`, `.commits`) and `hub.files(repo_id)` show what was pushed."""

    def __init__(self, tokens=None, *, lfs=False):
        self.tokens = dict(DEFAULT_TOKENS if tokens is None else tokens)
        self.lfs = lfs
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self._uploads = {}  # ticket -> (repo_id, sha256, size)

    def files(self, repo_id) -> dict[str, bytes]:
        with self.lock:
            return self.repos[repo_id].files

    def add_repo(self, repo_id, files=None, *, private=False):
        """Seed a repo (owner: its namespace) holding `files` ({path: bytes}) in one commit."""
        with self.lock:
            repo = self.repos[repo_id] = Repo(repo_id.split("/")[0], private)
            repo.commit("initial commit", {})
            if files:
                repo.commit("add files", {p: (d, self._is_lfs(p, len(d), d[:512])) for p, d in files.items()})

    def _is_lfs(self, path, size, sample):
        return self.lfs and size > 0 and (path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample)

    def __enter__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
        self.server.hub = self
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class _HubHandler(BaseHTTPRequestHandler):
    def _answer(self):
        body = b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hub = self.server.hub
        try:
            if "/gated-org/" in self.path:
                raise HubError(403, "Access to model gated-org/model is restricted.", "GatedRepo")
            url = urlsplit(self.path)
            self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            status, headers = 200, {}
            self.reply_headers = headers
            with hub.lock:
                try:
                    payload = self._route(hub, parts, body)
                except (KeyError, TypeError, ValueError) as error:  # a malformed request: 400, not a dropped connection
                    raise HubError(400, f"Malformed request: {error!r}") from None
        except HubError as e:
            status, payload = e.status, {"error": e.message, **e.extra}
            headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {}), **e.headers}
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json")
        self.send_response(status)
        for name, value in {"Content-Length": str(len(payload)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = _answer

    def log_message(self, *args):
        pass

    # --- routing -------------------------------------------------------------------------------------------------

    def _route(self, hub, p, body):
        post, get = self.command == "POST", self.command in ("GET", "HEAD")
        if p == ["api", "whoami-v2"] and get:
            return self._whoami(hub)
        if p == ["api", "validate-yaml"] and post:
            return {"errors": [], "warnings": []}
        if p == ["api", "repos", "create"] and post:
            return self._create(hub, json.loads(body))
        if p[:2] == ["api", "models"] and len(p) >= 4:
            repo_id, rest = f"{p[2]}/{p[3]}", p[4:] or ["revision", "main"]
            if rest[0] in ("xet-write-token", "xet-read-token"):
                raise HubError(400, "FakeHub has no Xet storage: run the client with HF_HUB_DISABLE_XET=1")
            if rest[0] == "revision" and len(rest) == 2 and get:
                return self._info(hub, repo_id, rest[1])
            if rest[0] == "tree" and len(rest) >= 2 and get:
                return self._tree(hub, repo_id, rest[1], "/".join(rest[2:]))
            if rest[0] == "preupload" and len(rest) == 2 and post:
                return self._preupload(hub, repo_id, rest[1], json.loads(body))
            if rest[0] == "commit" and len(rest) == 2 and post:
                return self._commit(hub, repo_id, rest[1], body)
        if len(p) == 6 and p[1].endswith(".git") and p[2:5] == ["info", "lfs", "objects"] and post:
            repo_id = f"{p[0]}/{p[1][:-4]}"
            if p[5] == "batch":
                self.reply_headers["Content-Type"] = "application/vnd.git-lfs+json"
                return self._batch(hub, repo_id, json.loads(body))
            if p[5] == "verify":
                if json.loads(body)["oid"] not in self._writable(hub, repo_id).lfs_objects:
                    raise HubError(404, "Object not found")
                return {"success": True}
        if len(p) == 2 and p[0] == "lfs-upload" and self.command == "PUT":
            return self._lfs_put(hub, p[1], body)
        if len(p) >= 5 and p[2] == "resolve" and get:
            return self._resolve(hub, f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]))
        raise HubError(404, "Repository not found.", "RepoNotFound")

    # --- auth ----------------------------------------------------------------------------------------------------

    def _user(self, hub, required=True):
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer ") :].strip() if auth.startswith("Bearer ") else None
        if token in hub.tokens:
            return token, *hub.tokens[token]
        if required:
            raise HubError(
                401, "Invalid credentials in Authorization header" if token else "Invalid username or password."
            )
        return None, None, None

    def _readable(self, hub, repo_id) -> Repo:
        repo = hub.repos.get(repo_id)
        if repo is None or (repo.private and self._user(hub, required=False)[1] != repo.owner):
            raise HubError(404, "Repository not found.", "RepoNotFound")
        return repo

    def _writable(self, hub, repo_id) -> Repo:
        _, user, role = self._user(hub)
        repo = self._readable(hub, repo_id)
        if role != "write" or user != repo.owner:
            raise HubError(403, "pass create_pr=1 as a query parameter to create a Pull Request")
        return repo

    # --- endpoints -----------------------------------------------------------------------------------------------

    def _whoami(self, hub):
        _, user, role = self._user(hub)
        token = {"displayName": f"{user}-{role}", "role": role, "createdAt": "2024-01-01T00:00:00.000Z"}
        auth = {"type": "access_token", "accessToken": token}
        return dict(type="user", id=_git_oid(user.encode())[:24], name=user, fullname=user, orgs=[], auth=auth)

    def _create(self, hub, payload):
        _, user, role = self._user(hub)
        namespace = payload.get("organization") or user
        if payload.get("type", "model") != "model":
            raise HubError(400, "FakeHub serves model repos only")
        if role != "write" or namespace != user:
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        repo_id = f"{namespace}/{payload['name']}"
        if repo_id in hub.repos:
            raise HubError(409, "You already created this model repo", url=f"{hub.url}/{repo_id}")
        repo = hub.repos[repo_id] = Repo(user, payload.get("visibility") == "private")
        repo.commit("initial commit", {})
        return {"url": f"{hub.url}/{repo_id}", "name": repo_id}

    def _info(self, hub, repo_id, revision):
        repo = self._readable(hub, repo_id)
        sha, tree = repo.snapshot(revision)
        siblings = [{"rfilename": path, **self._entry(path, *tree[path], sibling=True)} for path in sorted(tree)]
        info = {"id": repo_id, "author": repo.owner, "sha": sha, "private": repo.private, "gated": False}
        return {**info, "disabled": False, "tags": [], "createdAt": repo.created, "siblings": siblings}

    @staticmethod
    def _entry(path, data, lfs, sibling=False):
        oid = _git_oid(_lfs_pointer(data) if lfs else data)
        entry = {"size": len(data), "blobId" if sibling else "oid": oid}
        if lfs:
            sha = hashlib.sha256(data).hexdigest()
            pointer = len(_lfs_pointer(data))
            entry["lfs"] = {"size": len(data), "pointerSize": pointer, **({"sha256": sha} if sibling else {"oid": sha})}
        return entry if sibling else {"type": "file", "path": path, **entry}

    def _tree(self, hub, repo_id, revision, folder):
        _, tree = self._readable(hub, repo_id).snapshot(revision)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{folder}/" if folder else ""
        entries, dirs = [], set()
        for path, (data, lfs) in sorted(tree.items()):
            if not path.startswith(prefix):
                continue
            parents = path[len(prefix) :].split("/")[:-1]
            if recursive:
                dirs.update(prefix + "/".join(parents[:depth]) for depth in range(1, len(parents) + 1))
                entries.append(self._entry(path, data, lfs))
            elif parents:
                dirs.add(prefix + parents[0])
            else:
                entries.append(self._entry(path, data, lfs))
        if folder and not entries and not dirs:
            raise HubError(404, f"{folder} does not exist on main", "EntryNotFound")
        folders = [{"type": "directory", "oid": _git_oid(d.encode()), "size": 0, "path": d} for d in sorted(dirs)]
        return folders + entries

    def _preupload(self, hub, repo_id, revision, payload):
        repo = self._writable(hub, repo_id)
        sha, tree = repo.snapshot(revision)
        files = []
        for f in payload["files"]:
            lfs = hub._is_lfs(f["path"], f["size"], base64.b64decode(f["sample"]))
            stored = tree.get(f["path"])
            oid = None
            if stored is not None and stored[1] == lfs:
                oid = hashlib.sha256(stored[0]).hexdigest() if lfs else _git_oid(stored[0])
            mode = "lfs" if lfs else "regular"
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": files, "commitOid": sha}

    def _batch(self, hub, repo_id, payload):
        repo = self._writable(hub, repo_id)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "FakeHub's LFS batch API only uploads, with the basic transfer")
        objects = []
        for obj in payload["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in repo.lfs_objects:
                ticket = secrets.token_hex(16)
                hub._uploads[ticket] = (repo_id, obj["oid"], obj["size"])
                verify = f"{hub.url}/{repo_id}.git/info/lfs/objects/verify"
                answer["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{ticket}"}, "verify": {"href": verify}}
            objects.append(answer)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def _lfs_put(self, hub, ticket, body):
        if ticket not in hub._uploads:
            raise HubError(403, "Unknown or used upload ticket")
        repo_id, oid, size = hub._uploads.pop(ticket)
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"Uploaded object does not match oid {oid} and size {size}")
        hub.repos[repo_id].lfs_objects[oid] = body
        return b""

    def _commit(self, hub, repo_id, revision, body):
        repo = self._writable(hub, repo_id)
        if self.query.get("create_pr"):
            raise HubError(400, "FakeHub does not do pull requests")
        if revision != "main":
            raise HubError(404, f"Invalid rev id: {revision} (FakeHub commits to main only)", "RevisionNotFound")
        head, tree = repo.snapshot("main")
        tree, summary = dict(tree), ""
        for line in filter(None, body.splitlines()):
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value["summary"]
                if value.get("parentCommit") not in (None, head):
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                tree[value["path"]] = (base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                if value["oid"] not in repo.lfs_objects:
                    raise HubError(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                tree[value["path"]] = (repo.lfs_objects[value["oid"]], True)
            elif key == "deletedFile":
                if tree.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                tree = {path: entry for path, entry in tree.items() if not path.startswith(prefix)}
            else:
                raise HubError(400, f"FakeHub does not handle commit entries of type {key!r}")
        oid = repo.commit(summary, tree)
        return dict(success=True, commitOid=oid, commitUrl=f"{hub.url}/{repo_id}/commit/{oid}", pullRequestUrl=None)

    def _resolve(self, hub, repo_id, revision, path):
        sha, tree = self._readable(hub, repo_id).snapshot(revision)
        if path not in tree:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        data, lfs = tree[path]
        etag = f'"{hashlib.sha256(data).hexdigest() if lfs else _git_oid(data)}"'
        self.reply_headers.update({"X-Repo-Commit": sha, "ETag": etag, "Content-Type": "application/octet-stream"})
        if lfs:  # the Hub answers an LFS file with a redirect to its CDN carrying these; here the bytes come directly
            self.reply_headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(len(data))})
        return data

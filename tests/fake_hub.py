"""A small in-memory stand-in for the Hugging Face Hub, for offline round-trip tests.

No installable server implements the Hub's upload API, so this module speaks the part of it that
``huggingface_hub`` uses for ``create_repo``, ``create_branch``, ``upload_folder`` and
``hf_hub_download`` (and therefore timm's ``pretrained=True`` / ``hf-hub:`` loading):

* ``POST /api/repos/create`` (409 when the repository exists)
* ``POST /api/validate-yaml``
* ``POST /api/models/{repo}/preupload/{rev}``: always ``uploadMode: regular``, so file contents travel
  base64-encoded inside the commit and the LFS / Xet transfer paths are never needed
* ``POST /api/models/{repo}/commit/{rev}``: NDJSON ``header`` / ``file`` / ``deletedFile`` lines
* ``POST /api/models/{repo}/branch/{branch}``
* ``GET /api/models/{repo}[/revision/{rev}]``: repository info
* ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}`` with ``ETag``, ``X-Repo-Commit`` and ``X-Linked-Size``,
  and 404s carrying the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``)

Standard library only. The server listens on 127.0.0.1 on a free port, in a daemon thread.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

_REPO = r'(?P<repo>[^/]+/[^/]+)'
_API_REPO = re.compile(rf'^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$')
_PREUPLOAD = re.compile(rf'^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$')
_COMMIT = re.compile(rf'^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$')
_BRANCH = re.compile(rf'^/api/models/{_REPO}/branch/(?P<branch>[^/]+)$')
_RESOLVE = re.compile(rf'^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$')
# Files the real Hub stores with LFS: their ETag is the content's sha256, as the Hub reports it.
_LFS_SUFFIXES = ('.safetensors', '.bin', '.pth', '.pt', '.tar', '.ckpt')


@dataclass
class Repo:
    """One repository: commits as complete file snapshots, and refs (branches) pointing at them."""

    private: bool = False
    refs: Dict[str, str] = field(default_factory=dict)
    commits: Dict[str, Dict[str, bytes]] = field(default_factory=dict)

    def resolve(self, revision: str) -> Optional[str]:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


def _etag(path: str, content: bytes) -> str:
    if path.endswith(_LFS_SUFFIXES):
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b'blob %d\0' % len(content) + content).hexdigest()  # git blob id


class FakeHub:
    """The Hub's state plus a running HTTP server. Use as a context manager or call ``close()``."""

    def __init__(self) -> None:
        self.repos: Dict[str, Repo] = {}
        self.requests: List[Tuple[str, str]] = []  # (method, path) of every request received
        self.auth_headers: List[str] = []  # Authorization headers received (to check the token is sent)
        self.lock = threading.Lock()
        self._etags: Dict[Tuple[str, str], str] = {}  # (commit, path) -> ETag; hashing 90 MB per HEAD adds up
        self.server = ThreadingHTTPServer(('127.0.0.1', 0), _make_handler(self))
        self.server.daemon_threads = True
        self.endpoint = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, name='fake-hub', daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> 'FakeHub':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def files(self, repo_id: str, revision: str = 'main') -> Dict[str, bytes]:
        """The files of ``repo_id`` at ``revision``."""
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(revision)])

    # --- state changes, called by the handler under the lock ---

    def _create(self, repo_id: str, private: bool) -> bool:
        if repo_id in self.repos:
            return False
        repo = Repo(private=private)
        sha = hashlib.sha1(f'init {repo_id}'.encode()).hexdigest()
        repo.commits[sha] = {'.gitattributes': b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n'}
        repo.refs['main'] = sha
        self.repos[repo_id] = repo
        return True

    def _commit(self, repo: Repo, branch: str, lines: List[dict]) -> str:
        parent = repo.refs[branch]
        files = dict(repo.commits[parent])
        summary = ''
        for line in lines:
            key, value = line['key'], line['value']
            if key == 'header':
                summary = value.get('summary', '')
            elif key == 'file':
                if value.get('encoding') != 'base64':
                    raise ValueError(f'unsupported file encoding {value.get("encoding")!r}')
                files[value['path']] = base64.b64decode(value['content'])
            elif key == 'deletedFile':
                files.pop(value['path'], None)
            else:
                raise ValueError(f'unsupported commit operation {key!r}')
        digest = hashlib.sha1(parent.encode() + summary.encode())
        for path in sorted(files):
            digest.update(path.encode() + b'\0' + hashlib.sha1(files[path]).digest())
        sha = digest.hexdigest()
        repo.commits[sha] = files
        repo.refs[branch] = sha
        return sha


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        # --- helpers ---

        def _body(self) -> bytes:
            length = int(self.headers.get('Content-Length') or 0)
            return self.rfile.read(length) if length else b''

        def _send(self, status: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            if self.command != 'HEAD':
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: Optional[Dict[str, str]] = None) -> None:
            headers = {'Content-Type': 'application/json', **(headers or {})}
            self._send(status, json.dumps(obj).encode(), headers)

        def _error(self, status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None) -> None:
            # The Hub's error contract: X-Error-Code picks the client's exception class.
            self._json(
                status, {'error': message}, {'X-Error-Code': code, 'X-Error-Message': message, **(headers or {})}
            )

        def _route(self) -> Tuple[str, str]:
            path = unquote(urlsplit(self.path).path)
            with hub.lock:
                hub.requests.append((self.command, path))
                if self.headers.get('Authorization'):
                    hub.auth_headers.append(self.headers['Authorization'])
            return self.command, path

        def _repo(self, repo_id: str) -> Optional[Repo]:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, 'RepoNotFound', 'Repository not found')
            return repo

        def _snapshot(self, repo_id: str, revision: str) -> Optional[Tuple[Repo, str]]:
            """The repository and the commit a revision names, or None once a 404 has been sent."""
            repo = self._repo(repo_id)
            if repo is None:
                return None
            sha = repo.resolve(revision)
            if sha is None:
                self._error(404, 'RevisionNotFound', f'Invalid rev id: {revision}')
                return None
            return repo, sha

        # --- verbs ---

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            _, path = self._route()
            m = _RESOLVE.match(path)
            if m:
                return self._resolve(m['repo'], m['rev'], m['path'])
            m = _API_REPO.match(path)
            if m:
                return self._info(m['repo'], m['rev'] or 'main')
            self._error(404, 'NotFound', f'fake hub: no route for GET {path}')

        def do_POST(self) -> None:
            _, path = self._route()
            body = self._body()
            if path == '/api/repos/create':
                payload = json.loads(body)
                if payload.get('type', 'model') != 'model':
                    return self._error(400, 'BadRequest', 'fake hub only hosts model repositories')
                name, org = payload['name'], payload.get('organization')
                repo_id = f'{org}/{name}' if org else f'user/{name}'
                with hub.lock:
                    created = hub._create(repo_id, payload.get('visibility') == 'private' or payload.get('private'))
                if not created:
                    return self._json(409, {'error': 'You already created this model repo', 'url': ''})
                return self._json(200, {'url': f'{hub.endpoint}/{repo_id}', 'name': repo_id})
            if path == '/api/validate-yaml':
                return self._json(200, {'errors': [], 'warnings': []})
            m = _PREUPLOAD.match(path)
            if m:
                if self._repo(m['repo']) is None:
                    return
                files = json.loads(body)['files']
                answer = [{'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False} for f in files]
                return self._json(200, {'files': answer, 'commitOid': None})
            m = _COMMIT.match(path)
            if m:
                return self._commit(m['repo'], m['rev'], body)
            m = _BRANCH.match(path)
            if m:
                return self._branch(m['repo'], m['branch'], body)
            self._error(404, 'NotFound', f'fake hub: no route for POST {path}')

        # --- handlers ---

        def _commit(self, repo_id: str, branch: str, body: bytes) -> None:
            with hub.lock:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if branch not in repo.refs:
                    return self._error(404, 'RevisionNotFound', f'Invalid rev id: {branch}')
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                sha = hub._commit(repo, branch, lines)
            self._json(200, {'commitUrl': f'{hub.endpoint}/{repo_id}/commit/{sha}', 'commitOid': sha})

        def _branch(self, repo_id: str, branch: str, body: bytes) -> None:
            with hub.lock:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if branch in repo.refs:
                    return self._error(409, 'Conflict', f'Reference already exists: refs/heads/{branch}')
                start = (json.loads(body) if body else {}).get('startingPoint') or 'main'
                sha = repo.resolve(start)
                if sha is None:
                    return self._error(404, 'RevisionNotFound', f'Invalid rev id: {start}')
                repo.refs[branch] = sha
            self._json(200, {})

        def _info(self, repo_id: str, revision: str) -> None:
            with hub.lock:
                snapshot = self._snapshot(repo_id, revision)
                if snapshot is None:
                    return
                repo, sha = snapshot
                files = sorted(repo.commits[sha])
            info = {
                'id': repo_id,
                'modelId': repo_id,
                'sha': sha,
                'private': repo.private,
                'siblings': [{'rfilename': f} for f in files],
                'tags': [],
            }
            self._json(200, info)

        def _resolve(self, repo_id: str, revision: str, path: str) -> None:
            with hub.lock:
                snapshot = self._snapshot(repo_id, revision)
                if snapshot is None:
                    return
                repo, sha = snapshot
                content = repo.commits[sha].get(path)
            if content is None:
                # X-Repo-Commit on the 404 lets the client cache that the file does not exist.
                return self._error(404, 'EntryNotFound', f'{path} does not exist', {'X-Repo-Commit': sha})
            with hub.lock:
                etag = hub._etags.get((sha, path)) or hub._etags.setdefault((sha, path), _etag(path, content))
            headers = {
                'ETag': f'"{etag}"',
                'X-Repo-Commit': sha,
                'X-Linked-Size': str(len(content)),
                'Content-Type': 'application/octet-stream',
            }
            # Resumed downloads ask for the tail of a file.
            rng = re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range') or '')
            if rng and self.command == 'GET':
                start = int(rng[1])
                headers['Content-Range'] = f'bytes {start}-{len(content) - 1}/{len(content)}'
                return self._send(206, content[start:], headers)
            self._send(200, content, headers)

    return Handler

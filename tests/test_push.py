"""``fp4fmt.hub.push`` (``fp4fmt push``) and the model card, against a fake Hugging Face Hub.

The fake Hub is a stdlib ``http.server`` on 127.0.0.1 that answers the calls huggingface_hub 2.4.0 makes for
``create_repo``, ``create_branch``, ``preupload_lfs_files`` and ``create_commit``: ``POST /api/repos/create``,
``POST /api/models/{repo}/branch/{branch}``, ``POST /api/models/{repo}/preupload/{rev}``,
``POST /{repo}.git/info/lfs/objects/batch`` then ``PUT`` of each LFS object to the URL it hands out (and the
``verify`` call), ``POST /api/validate-yaml`` (README metadata) and ``POST /api/models/{repo}/commit/{rev}``
(NDJSON: regular files in base64, LFS files by sha256). It records what arrived, checks every LFS body
against its sha256 and refuses a preupload or commit to a branch that does not exist. Anything else is a
404 recorded as unexpected.

Real pushes run in a subprocess whose environment points huggingface_hub at the fake Hub (``HF_ENDPOINT``,
read at import), with a private ``HF_HOME`` and ``HF_HUB_DISABLE_XET=1``: with ``hf_xet`` installed,
LFS-sized files would otherwise go to Xet storage (a separate CAS protocol this fake does not speak) rather
than through the LFS batch API.

The checkpoints are tiny Llama-shaped BF16 models (``tools/make_demo_checkpoint.py``) converted by
``convert_checkpoint``: NVFP4 in four shards with an index, MXFP4 in one file; the source folder carries a
tokenizer and a README.md with ``license: apache-2.0`` (the source model's card, which convert copies).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import fp4fmt
from fp4fmt.converters.checkpoint import Options, convert_checkpoint
from fp4fmt.errors import FP4FmtError
from fp4fmt.hub import PushResult, model_card, push, redact
from fp4fmt.inspection import inspect_path

import make_demo_checkpoint  # tools/, put on sys.path by conftest.py

TOKEN = "hf_FAKE_TOKEN_abc123"
SOURCE_README = "---\nlicense: apache-2.0\nlanguage:\n- en\n---\n\n# Tiny source model\n\nThe original card.\n"


# ================================================================================================ checkpoints


def _source(folder: Path) -> Path:
    folder.mkdir(parents=True)
    tensors = make_demo_checkpoint.make(layers=1, hidden=128, intermediate=256, vocab=256, seed=3)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
              "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 1,
              "vocab_size": 256, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (folder / "README.md").write_text(SOURCE_README)
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    """Read-only converted checkpoints by scheme, and the BF16 source under "source"."""
    root = tmp_path_factory.mktemp("push")
    src = _source(root / "src")
    out = {"source": src}
    out["nvfp4"] = convert_checkpoint(src, root / "tiny-nvfp4", Options(scheme="nvfp4", max_shard_bytes=60_000)).dst
    out["mxfp4"] = convert_checkpoint(src, root / "tiny-mxfp4", Options(scheme="mxfp4")).dst
    assert len(list(out["nvfp4"].glob("*.safetensors"))) > 1
    assert (out["nvfp4"] / "model.safetensors.index.json").exists()
    assert (out["nvfp4"] / "README.md").read_text() == SOURCE_README  # convert copies the source card
    return out


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


PNG = b"\x89PNG\r\n\x1a\n"  # the bytes after the signature are opaque to push: nothing decodes them

EVAL = {
    "variants": [
        {"name": "bf16", "perplexity": 12.5, "kl_mean": 0.0, "top1_agreement": 1.0, "decode_tokens_per_s": 101.5,
         "crack_hunt": {"accuracy_by_level": {"easy": 0.9, "hard": 0.5}}},
        {"name": "nvfp4", "perplexity": 13.25, "kl_mean": 0.0123, "kl_p99": 0.25, "decode_tokens_per_s": 180.0,
         "crack_hunt": {"accuracy_by_level": {"easy": 0.85, "expert": 0.125}}},
        "not a variant",
    ],
    "plots": {"Perplexity by variant": "plots/ppl.png", "KL": "kl.png"},
}


@pytest.fixture()
def eval_json(tmp_path: Path) -> Path:
    d = tmp_path / "eval-out"
    (d / "plots").mkdir(parents=True)
    (d / "plots" / "ppl.png").write_bytes(PNG + os.urandom(3000))
    (d / "kl.png").write_bytes(PNG + os.urandom(2000))
    (d / "results.json").write_text(json.dumps(EVAL))
    return d / "results.json"


def eval_uploads(eval_json: Path) -> dict[str, bytes]:
    d = eval_json.parent
    return {"eval/results.json": eval_json.read_bytes(), "eval/plots/ppl.png": (d / "plots/ppl.png").read_bytes(),
            "eval/kl.png": (d / "kl.png").read_bytes()}


# ================================================================================================== fake Hub


class FakeHub:
    """What arrived at the fake Hub, and how it answers (``fail_commit``: 403 echoing the Authorization header)."""

    LFS_SUFFIXES = (".safetensors", ".png")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self.unexpected: list[tuple[str, str]] = []
        self.repos: dict[str, dict] = {}  # repo id -> {"payload": create payload, "branches": set}
        self.branch_calls: list[tuple[str, str, int]] = []  # repo, branch, status answered
        self.lfs: dict[str, bytes] = {}  # oid -> bytes PUT (sha256 checked)
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "files": {path: bytes}, "kinds": {path: kind}}
        self.validated: list[str] = []
        self.error_bodies: list[str] = []
        self.fail_commit = False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, obj, headers: dict | None = None) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                hub.handle(self, "POST")

            def do_PUT(self) -> None:
                hub.handle(self, "PUT")

            def do_GET(self) -> None:
                hub.handle(self, "GET")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def handle(self, h, method: str) -> None:
        path = urlsplit(h.path).path
        body = h._body()
        auth = h.headers.get("Authorization")
        with self.lock:
            self.requests.append((method, path, auth))
        if (path.startswith("/api/") or ".git/" in path) and auth != f"Bearer {TOKEN}":
            return h._send(401, {"error": "Invalid credentials"})
        routes = [
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)", self.create_branch),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self.preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self.commit),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.lfs_put),
            ("POST", r"/lfs-verify", self.lfs_verify),
        ]
        for m, pattern, fn in routes:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                args = {k: unquote(v) for k, v in match.groupdict().items()}
                with self.lock:
                    status, obj, *headers = fn(body, auth=auth, **args)
                return h._send(status, obj, *headers)
        with self.lock:
            self.unexpected.append((method, path))
        h._send(404, {"error": f"fake hub does not serve {method} {path}"})

    # --------------------------------------------------------------------------------------------- routes

    def create_repo(self, body: bytes, auth):
        payload = json.loads(body)
        repo = f"{payload.get('organization') or 'fake-user'}/{payload['name']}"
        url = f"{self.endpoint}/{repo}"
        if repo in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        self.repos[repo] = {"payload": payload, "branches": {"main"}}
        return 200, {"url": url}

    def validate_yaml(self, body: bytes, auth):
        self.validated.append(json.loads(body)["content"])
        return 200, {"errors": [], "warnings": []}

    def create_branch(self, body: bytes, auth, repo: str, rev: str):
        if repo not in self.repos:
            return (404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        status = 409 if rev in self.repos[repo]["branches"] else 200
        self.branch_calls.append((repo, rev, status))
        self.repos[repo]["branches"].add(rev)
        return (409, {"error": "Reference already exists"}) if status == 409 else (200, {})

    def _missing(self, repo: str, rev: str):
        if repo not in self.repos:
            return (404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if rev not in self.repos[repo]["branches"]:
            return (404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
        return None

    def preupload(self, body: bytes, auth, repo: str, rev: str):
        if err := self._missing(repo, rev):
            return err
        files = json.loads(body)["files"]
        return 200, {"files": [{"path": f["path"], "shouldIgnore": False, "oid": None,
                                "uploadMode": "lfs" if f["path"].endswith(self.LFS_SUFFIXES) else "regular"}
                               for f in files]}

    def lfs_batch(self, body: bytes, auth, repo: str):
        req = json.loads(body)
        assert req["operation"] == "upload"
        objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                    "actions": {"upload": {"href": f"{self.endpoint}/lfs-upload/{o['oid']}"},
                                "verify": {"href": f"{self.endpoint}/lfs-verify"}}}
                   for o in req["objects"]]
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_put(self, body: bytes, auth, oid: str):
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "sha256 mismatch"}
        self.lfs[oid] = body
        return 200, {}

    def lfs_verify(self, body: bytes, auth):
        req = json.loads(body)
        ok = req["oid"] in self.lfs and len(self.lfs[req["oid"]]) == req["size"]
        return (200, {}) if ok else (404, {"error": "object not uploaded"})

    def commit(self, body: bytes, auth, repo: str, rev: str):
        if err := self._missing(repo, rev):
            return err
        if self.fail_commit:
            msg = f"write access refused for {auth}"  # a careless server echoing the credential
            self.error_bodies.append(msg)
            return 403, {"error": msg}, {"X-Error-Message": msg}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        assert lines[0]["key"] == "header"
        files, kinds = {}, {}
        for item in lines[1:]:
            v = item["value"]
            if item["key"] == "file":
                assert v["encoding"] == "base64"
                files[v["path"]], kinds[v["path"]] = base64.b64decode(v["content"]), "regular"
            elif item["key"] == "lfsFile":
                if v["oid"] not in self.lfs or len(self.lfs[v["oid"]]) != v["size"]:
                    return 422, {"error": f"LFS object of {v['path']} was never uploaded"}
                files[v["path"]], kinds[v["path"]] = self.lfs[v["oid"]], "lfs"
            else:
                return 400, {"error": f"unexpected commit item {item['key']}"}
        oid = hashlib.sha1(body).hexdigest()
        self.commits.append({"repo": repo, "revision": rev, "summary": lines[0]["value"]["summary"],
                             "files": files, "kinds": kinds, "oid": oid})
        return 200, {"commitUrl": f"{self.endpoint}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}


@pytest.fixture()
def hub() -> Iterator[FakeHub]:
    h = FakeHub()
    h.thread.start()
    yield h
    h.server.shutdown()
    h.server.server_close()


DRIVER = r"""
import json, logging, sys, traceback
from dataclasses import asdict
logging.basicConfig(level=logging.DEBUG)  # every log line, the HTTP transport's wire trace included
from huggingface_hub.utils import logging as hf_logging
hf_logging.set_verbosity_debug()
spec = json.loads(sys.stdin.read())
if not spec["wire_log"]:  # the trace prints raw response headers, which a careless server can fill
    logging.getLogger("httpcore2").setLevel(logging.INFO)
from fp4fmt.hub import push
events = []
try:
    r = push(spec["path"], spec["repo_id"], progress=lambda *a: events.append(a), **spec["kwargs"])
    print(repr(r), file=sys.stderr)
    print(json.dumps({"result": asdict(r), "progress": events}))
except Exception as e:
    traceback.print_exc()
    print(json.dumps({"error": str(e), "type": type(e).__name__, "progress": events}))
"""


def run_push(hub: FakeHub, tmp_path: Path, path: Path, repo_id: str, *, token_source: str = "env",
             wire_log: bool = True, **kwargs) -> tuple[dict, str]:
    """Push in a fresh interpreter pointed at the fake Hub, logging at debug level; (its JSON answer, all of
    its stdout and stderr, log lines and any traceback included). ``wire_log``: include the HTTP transport's
    debug trace (it shows request lines but not request headers; it does show response headers).
    ``token_source``: "env" (HF_TOKEN), "argument", "stored" (the token file in HF_HOME) or "none"."""
    home = Path(tempfile.mkdtemp(prefix="hf-home-", dir=tmp_path))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING")) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DEBUG="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    if token_source == "env":
        env["HF_TOKEN"] = TOKEN
    elif token_source == "argument":
        kwargs["token"] = TOKEN
    elif token_source == "stored":
        (home / "token").write_text(TOKEN)
    kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
    spec = {"path": str(path), "repo_id": repo_id, "wire_log": wire_log, "kwargs": kwargs}
    p = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(spec), capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    return json.loads(p.stdout.strip().splitlines()[-1]), out


def assert_token_sent_everywhere(hub: FakeHub) -> None:
    api = [(m, p, a) for m, p, a in hub.requests if p.startswith("/api/") or ".git/" in p]
    assert api and all(a == f"Bearer {TOKEN}" for _, _, a in api), api
    assert not hub.unexpected, hub.unexpected


# ================================================================================================ real pushes


def test_push_uploads_exactly_the_checkpoint_card_and_eval(hub: FakeHub, ckpt, tmp_path: Path, eval_json: Path) -> None:
    dst = ckpt["nvfp4"]
    before = tree(dst)
    answer, out = run_push(hub, tmp_path, dst, "me/tiny-nvfp4", private=True, eval_json=eval_json,
                           base_model="org/tiny-base")
    assert "result" in answer, answer
    r = answer["result"]

    # the repo was created private, under the namespace asked for, and got one commit on main
    assert hub.repos["me/tiny-nvfp4"]["payload"] == {"name": "tiny-nvfp4", "organization": "me",
                                                     "visibility": "private"}
    assert [(c["repo"], c["revision"]) for c in hub.commits] == [("me/tiny-nvfp4", "main")]
    commit = hub.commits[0]

    # exactly the checkpoint's files (its README.md, the source model's card, replaced by the generated
    # one) plus the eval JSON and plots, byte for byte
    expected = {**before, "README.md": r["card"].encode(), **eval_uploads(eval_json)}
    assert sorted(commit["files"]) == sorted(expected)
    differ = [p for p in expected if commit["files"][p] != expected[p]]
    assert not differ, differ
    assert commit["files"]["README.md"] != before["README.md"]
    assert hub.validated == [r["card"]]
    assert tree(dst) == before  # push never writes into the directory

    # shards and images went through LFS (each PUT body matched its sha256), JSON/text in the commit body
    binary = {p for p in expected if p.endswith((".safetensors", ".png"))}
    assert {p for p, k in commit["kinds"].items() if k == "lfs"} == binary and len(hub.lfs) == len(binary)

    # the result lists what arrived
    assert [tuple(f) for f in r["files"]] == sorted((p, len(b)) for p, b in expected.items())
    assert r["repo_id"] == "me/tiny-nvfp4" and r["revision"] == "main" and r["commit"] == commit["oid"]
    assert r["url"] == f"{hub.endpoint}/me/tiny-nvfp4"

    # progress: every shard verified, bytes counted up to the total, then the commit
    shards = len(list(dst.glob("*.safetensors")))
    ev = [tuple(e) for e in answer["progress"]]
    assert [e for e in ev if e[0] == "verifying"][-1] == ("verifying", shards, shards)
    up = [e for e in ev if e[0] == "uploading"]
    total = sum(len(b) for b in expected.values())
    assert all(e[2] == total for e in up) and [e[1] for e in up] == sorted(e[1] for e in up) and up[-1][1] == total
    assert ev[-1] == ("committing", 1, 1)

    assert_token_sent_everywhere(hub)
    assert "httpcore2" in out and "huggingface_hub" in out  # the debug logs were captured ...
    assert TOKEN not in out and TOKEN not in json.dumps(answer)  # ... and hold no token


@pytest.mark.parametrize("token_source", ["argument", "stored"])
def test_token_sources_and_default_namespace(hub: FakeHub, ckpt, tmp_path: Path, token_source: str) -> None:
    """The token from the argument or the stored login works like HF_TOKEN; a bare name lands in the user's
    namespace, public unless asked."""
    answer, out = run_push(hub, tmp_path, ckpt["mxfp4"], "tiny-mxfp4", token_source=token_source)
    r = answer["result"]
    assert r["repo_id"] == "fake-user/tiny-mxfp4"
    assert hub.repos["fake-user/tiny-mxfp4"]["payload"]["visibility"] == "public"
    expected = {**tree(ckpt["mxfp4"]), "README.md": r["card"].encode()}
    assert hub.commits[0]["files"] == expected
    assert_token_sent_everywhere(hub)
    assert TOKEN not in out


def test_revision_creates_the_branch_once(hub: FakeHub, ckpt, tmp_path: Path) -> None:
    """A revision that does not exist is created from main before anything is uploaded (the fake Hub refuses
    a preupload or commit to a missing branch); pushing again finds repo and branch there."""
    for _ in range(2):
        answer, out = run_push(hub, tmp_path, ckpt["mxfp4"], "me/tiny", revision="fp4/mxfp4",
                               commit_message="MXFP4 weights")
        r = answer["result"]
        assert r["revision"] == "fp4/mxfp4" and r["url"] == f"{hub.endpoint}/me/tiny/tree/fp4/mxfp4"
        assert TOKEN not in out
    assert hub.branch_calls == [("me/tiny", "fp4/mxfp4", 200), ("me/tiny", "fp4/mxfp4", 409)]
    assert [(c["revision"], c["summary"]) for c in hub.commits] == [("fp4/mxfp4", "MXFP4 weights")] * 2
    assert "revision=\"fp4/mxfp4\"" in hub.commits[0]["files"]["README.md"].decode()
    assert_token_sent_everywhere(hub)


def test_hub_errors_never_carry_the_token(hub: FakeHub, ckpt, tmp_path: Path) -> None:
    """The fake Hub refuses the commit with a message that echoes the credential: the error push raises,
    its traceback and everything printed are free of the token."""
    hub.fail_commit = True
    # (wire_log=False: the transport's own debug trace would print the echoing response header verbatim)
    answer, out = run_push(hub, tmp_path, ckpt["mxfp4"], "me/tiny", token_source="argument", wire_log=False)
    assert answer["type"] == "FP4FmtError"
    assert "403" in answer["error"] and "me/tiny" in answer["error"] and str(ckpt["mxfp4"]) in answer["error"]
    assert hub.error_bodies and all(TOKEN in b for b in hub.error_bodies)  # the server did send it back
    assert TOKEN not in answer["error"] and TOKEN not in out
    assert "write access refused" in answer["error"]


def test_no_token_is_refused_before_any_request(hub: FakeHub, ckpt, tmp_path: Path) -> None:
    answer, _ = run_push(hub, tmp_path, ckpt["mxfp4"], "me/tiny", token_source="none")
    assert answer["type"] == "FP4FmtError" and "no Hugging Face token" in answer["error"]
    assert hub.requests == []


# ============================================================================================ offline checks


@pytest.fixture()
def no_network(monkeypatch, tmp_path: Path) -> None:
    """Any connection attempt fails the test; no token anywhere."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))


def test_dry_run_lists_everything_without_network_or_token(ckpt, eval_json: Path, no_network) -> None:
    dst = ckpt["nvfp4"]
    before = tree(dst)
    r = push(dst, "me/tiny-nvfp4", dry_run=True, eval_json=eval_json, base_model="org/tiny-base")
    assert isinstance(r, PushResult) and r.url is None and r.commit is None and r.revision == "main"
    expected = {**before, "README.md": r.card.encode(), **eval_uploads(eval_json)}
    assert list(r.files) == sorted((p, len(b)) for p, b in expected.items())
    assert r.card == model_card(dst, eval_json, base_model="org/tiny-base", repo_id="me/tiny-nvfp4")
    assert tree(dst) == before


def test_without_huggingface_hub_only_the_dry_run_works(ckpt, no_network, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub now raises ImportError
    assert push(ckpt["mxfp4"], "me/x", dry_run=True).url is None
    with pytest.raises(FP4FmtError, match=re.escape("pip install 'fp4fmt[hub]'")):
        push(ckpt["mxfp4"], "me/x", token=TOKEN)


def _corrupt_one_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    pos = header + (len(data) - header) // 2  # in the tensor data, past the header
    data[pos] ^= 0x01
    f.write_bytes(bytes(data))


def test_refuses_a_checkpoint_that_fails_verification(ckpt, tmp_path: Path, no_network) -> None:
    bad = shutil.copytree(ckpt["nvfp4"], tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[1]
    _corrupt_one_byte(shard)
    for dry in (True, False):
        with pytest.raises(FP4FmtError, match="fails verification") as e:
            push(bad, "me/x", dry_run=dry, token=TOKEN)
        assert str(bad) in str(e.value) and shard.name in str(e.value)


def test_refuses_an_unfinished_conversion(ckpt, tmp_path: Path, no_network) -> None:
    # a conversion interrupted part way (here by its progress callback) leaves its work folder behind
    def interrupt(stage: str, done: int, total: int) -> None:
        if stage == "converting" and done >= 2:
            raise KeyboardInterrupt

    half = tmp_path / "half"
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(ckpt["source"], half, Options(scheme="nvfp4", max_shard_bytes=60_000), progress=interrupt)
    # a finished one with a stray temporary file of an interrupted rewrite
    stray = shutil.copytree(ckpt["nvfp4"], tmp_path / "stray")
    (stray / ".model-00001-of-00004.safetensors.fp4fmt-tmp").write_bytes(b"partial")
    for d in (half, stray):
        for dry in (True, False):
            with pytest.raises(FP4FmtError, match="unfinished conversion") as e:
                push(d, "me/x", dry_run=dry, token=TOKEN)
            assert str(d) in str(e.value)


def test_refuses_what_is_not_an_fp4fmt_checkpoint(ckpt, tmp_path: Path, no_network) -> None:
    cases = {}
    cases["source"] = (ckpt["source"], "quant_method 'fp4fmt'")  # the BF16 source itself
    d = shutil.copytree(ckpt["mxfp4"], tmp_path / "no-config")
    (d / "config.json").unlink()
    cases["no-config"] = (d, "no config.json")
    d = shutil.copytree(ckpt["mxfp4"], tmp_path / "other-method")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "compressed-tensors"
    (d / "config.json").write_text(json.dumps(cfg))
    cases["other-method"] = (d, "'compressed-tensors'")
    d = shutil.copytree(ckpt["mxfp4"], tmp_path / "pickle")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    cases["pickle"] = (d, "pickle")
    cases["file"] = (ckpt["mxfp4"] / "model.safetensors", "not a directory")
    for name, (path, why) in cases.items():
        with pytest.raises(FP4FmtError, match=re.escape(why)) as e:
            push(path, "me/x", dry_run=True)
        assert str(path) in str(e.value), name
    for bad_id in ("me/x/y", "", "me/../x", "me/x.git", "-x"):
        with pytest.raises(FP4FmtError, match="not a valid Hub repo id"):
            push(ckpt["mxfp4"], bad_id, dry_run=True)
    with pytest.raises(FP4FmtError, match="card must be one of"):
        push(ckpt["mxfp4"], "me/x", dry_run=True, card="none")


def test_card_modes(ckpt, tmp_path: Path, no_network) -> None:
    """auto: a README written for fp4fmt is kept, the source model's card is replaced; generate always
    generates; keep uploads the directory's README.md as it is."""
    src_card = push(ckpt["mxfp4"], "me/x", dry_run=True, card="keep")
    assert src_card.card == SOURCE_README and ("README.md", len(SOURCE_README)) in src_card.files
    auto = push(ckpt["mxfp4"], "me/x", dry_run=True)
    assert auto.card != SOURCE_README and "library_name" in auto.card

    own = shutil.copytree(ckpt["mxfp4"], tmp_path / "own")
    hand = "---\ntags: [fp4fmt, mine]\nlicense: mit\n---\n\n# Hand written\n"
    (own / "README.md").write_text(hand)
    assert push(own, "me/x", dry_run=True).card == hand
    gen = push(own, "me/x", dry_run=True, card="generate")
    assert gen.card != hand and _front(gen.card)["license"] == "mit"
    assert (own / "README.md").read_text() == hand

    (own / "README.md").unlink()
    with pytest.raises(FP4FmtError, match="no README.md"):
        push(own, "me/x", dry_run=True, card="keep")
    card = push(own, "me/x", dry_run=True).card
    assert "license" not in _front(card) and ("README.md", len(card.encode())) in push(own, "me/x", dry_run=True).files


# ================================================================================================ the card


def _front(card: str) -> dict:
    """The YAML front matter of a card, parsed (the card must start with it)."""
    assert card.startswith("---\n")
    end = card.index("\n---\n", 4)
    meta = yaml.safe_load(card[4:end])
    assert isinstance(meta, dict)
    return meta


def _table(card: str, after: str) -> list[list[str]]:
    """The cells of the first Markdown table after the heading ``after``."""
    lines = card[card.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_model_card_metadata_and_figures(ckpt, scheme: str) -> None:
    dst = ckpt[scheme]
    card = model_card(dst, base_model="org/tiny-base", repo_id="me/tiny")
    meta = _front(card)
    assert {"fp4fmt", "fp4", scheme, "quantized"} <= set(meta["tags"])
    assert meta["library_name"] == "fp4fmt" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"  # from the source card convert copied
    assert meta["base_model"] == "org/tiny-base" and meta["base_model_relation"] == "quantized"
    assert "base_model" not in _front(model_card(dst))

    rows = dict(r for r in _table(card, "## Quantization")[2:])
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    files = inspect_path(dst)["summary"]["by_kind"][scheme]  # from the shards' headers
    report = json.loads((dst / "fp4fmt_report.json").read_text())
    assert rows["Scheme"] == scheme.upper()
    assert int(rows["Block size"]) == fp4fmt.SCHEMES[scheme].block_size
    assert int(rows["Quantized tensors"].replace(",", "")) == files["tensors"]
    assert int(rows["Quantized parameters"].replace(",", "")) == files["params"]
    bpw = float(rows["Bits per quantized weight (codes and scales)"])
    assert bpw == pytest.approx(files["bits_per_weight"], abs=1e-3)
    sqnr = min(e["sqnr_db"] for e in report["tensors"].values() if e["action"] == "quantized")
    assert float(rows["Lowest SQNR of a quantized tensor"].split()[0]) == pytest.approx(sqnr, abs=0.006)
    assert all(f"`{name}`" in rows["Kept in high precision"] for name in qc["ignore"]) and qc["ignore"]
    fused = [v for k, v in rows.items() if k.startswith("Shared tensor scale")]
    assert fused == ["yes" if scheme == "nvfp4" else "no"]
    assert "fp4fmt.torch.from_pretrained(path" in card and 'snapshot_download("me/tiny")' in card
    assert "## Evaluation" not in card


def test_model_card_eval_table_and_plots(ckpt, eval_json: Path) -> None:
    card = model_card(ckpt["nvfp4"], eval_json)
    _front(card)
    table = _table(card, "## Evaluation")
    header, body = table[0], table[2:]
    assert header == ["Variant", "Perplexity", "KL mean", "KL p99", "Top-1 agreement", "Decode tok/s",
                      "Crack hunt: easy", "Crack hunt: hard", "Crack hunt: expert"]  # no variant has prefill
    assert [row[0] for row in body] == ["bf16", "nvfp4"]  # the non-dict entry is skipped
    keys = [None, "perplexity", "kl_mean", "kl_p99", "top1_agreement", "decode_tokens_per_s"]
    for row, v in zip(body, [x for x in EVAL["variants"] if isinstance(x, dict)]):
        levels = v["crack_hunt"]["accuracy_by_level"]
        want = [v.get(k) for k in keys[1:]] + [levels.get(lv) for lv in ("easy", "hard", "expert")]
        for cell, value in zip(row[1:], want):
            if value is None:
                assert cell == "–"
            else:
                assert float(cell) == pytest.approx(value, rel=1e-3, abs=1e-9)
    assert "![Perplexity by variant](eval/plots/ppl.png)" in card and "![KL](eval/kl.png)" in card

    # tolerant of what is absent
    d = eval_json.parent
    (d / "empty.json").write_text("{}")
    assert "## Evaluation" not in model_card(ckpt["nvfp4"], d / "empty.json")
    (d / "names.json").write_text(json.dumps({"variants": [{"name": "a|b"}], "plots": {"x": None}}))
    assert _table(model_card(ckpt["nvfp4"], d / "names.json"), "## Evaluation") == [["Variant"], ["---"], ["a\\|b"]]

    # plots must be images inside the eval folder that exist
    (tmp := d.parent / "outside.png").write_bytes(PNG)
    for plots, why in [({"p": "../outside.png"}, "inside the eval JSON's folder"),
                       ({"p": "gone.png"}, "does not exist"), ({"p": "results.json"}, "not an image")]:
        (d / "bad.json").write_text(json.dumps({"plots": plots}))
        with pytest.raises(FP4FmtError, match=re.escape(why)):
            model_card(ckpt["nvfp4"], d / "bad.json")
    assert tmp.exists()


@settings(max_examples=150, deadline=None)
@given(base_model=st.text(min_size=1, max_size=40),
       repo=st.from_regex(r"[a-z][a-z0-9_.-]{0,20}/[a-z][a-z0-9_-]{0,20}", fullmatch=True))
def test_front_matter_round_trips_any_text(ckpt, base_model: str, repo: str) -> None:
    """Whatever the base model string, the front matter parses back to exactly the values written."""
    card = model_card(ckpt["mxfp4"], base_model=base_model, repo_id=repo)
    meta = _front(card)
    assert meta["base_model"] == base_model and meta["license"] == "apache-2.0"
    assert f"# {repo.split('/')[-1]}" in card


_secret_chars = st.sampled_from("abhf_*Bearer 0123")


@settings(max_examples=400, deadline=None)
@given(secret=st.text(_secret_chars, min_size=1, max_size=8), parts=st.lists(st.one_of(
    st.text(_secret_chars, max_size=6), st.just("<SECRET>"), st.just("<HALF>")), max_size=10))
def test_redact_leaves_no_occurrence(secret: str, parts: list[str]) -> None:
    """No occurrence of the secret survives, however it overlaps itself, the marker or its neighbours;
    a text without the secret or a Bearer credential is left as it is."""
    text = "".join(secret if p == "<SECRET>" else secret[: len(secret) // 2 + 1] if p == "<HALF>" else p
                   for p in parts)
    out = redact(text, secret)
    assert secret not in out
    if secret not in text and "bearer" not in text.lower():
        assert out == text

"""``synthpref push``: the real huggingface_hub upload code against a recording Hub on 127.0.0.1.

The real Hub cannot be reached from the tests, so a small threaded HTTP server implements the routes
huggingface_hub calls for ``create_repo`` and ``upload_folder``: ``/api/repos/create``, the preupload
and commit endpoints, ``/api/validate-yaml`` and the Git LFS batch API with a basic PUT transfer. It
records every request, rebuilds the committed files, and is stopped by the fixture.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthpref.cli import app
from tests.curation_fixtures import FAKE, PROMPTS, run_recipe

runner = CliRunner()
TOKEN = "hf_synthpref_TEST_token_0123456789abcdef"
REPO = "test-org/prefs"


class RecordingHub:
    """What the fake Hub received: requests, created repos and the files of each commit."""

    def __init__(self, lfs: bool) -> None:
        self.lfs = lfs
        self.requests: list[dict] = []
        self.created: list[dict] = []
        self.blobs: dict[str, bytes] = {}
        self.files: dict[str, bytes] = {}
        self.commits: list[list[dict]] = []
        self.unexpected: list[str] = []
        self.base = ""


def _handler(hub: RecordingHub):
    class Handler(BaseHTTPRequestHandler):
        timeout = 20  # seconds per socket read: a stuck client cannot hang the test

        def log_message(self, *args):  # keep test output clean
            pass

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _reply(self, status: int, payload=None) -> None:
            data = json.dumps(payload).encode() if payload is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            body = self._body()
            path = self.path.split("?")[0]
            hub.requests.append(
                {"method": method, "path": path, "auth": self.headers.get("Authorization"),
                 "body": body, "headers": dict(self.headers)}
            )  # fmt: skip
            if method == "POST" and path == "/api/repos/create":
                payload = json.loads(body)
                hub.created.append(payload)
                repo = f"{payload['organization']}/{payload['name']}"
                return self._reply(
                    200, {"url": f"{hub.base}/datasets/{repo}", "name": repo, "id": "1"}
                )
            if method == "POST" and path == "/api/validate-yaml":
                return self._reply(200, {"errors": [], "warnings": []})
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/preupload/([^/]+)", path)
            if method == "POST" and m:
                files = json.loads(body)["files"]
                binary = (".parquet", ".png")
                return self._reply(200, {"files": [
                    {"path": f["path"], "shouldIgnore": False, "oid": None,
                     "uploadMode": "lfs" if hub.lfs and f["path"].endswith(binary) else "regular"}
                    for f in files
                ]})  # fmt: skip
            m = re.fullmatch(r"/datasets/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if method == "POST" and m:
                objects = json.loads(body)["objects"]
                return self._reply(200, {"transfer": "basic", "objects": [
                    {"oid": o["oid"], "size": o["size"], "authenticated": True,
                     "actions": {"upload": {"href": f"{hub.base}/lfs-upload/{o['oid']}"}}}
                    for o in objects
                ]})  # fmt: skip
            m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
            if method == "PUT" and m:
                assert hashlib.sha256(body).hexdigest() == m[1]
                hub.blobs[m[1]] = body
                return self._reply(200)
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/commit/([^/]+)", path)
            if method == "POST" and m:
                items = [json.loads(line) for line in body.splitlines() if line.strip()]
                hub.commits.append(items)
                for item in items:
                    value = item["value"]
                    if item["key"] == "file":
                        hub.files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        hub.files[value["path"]] = hub.blobs[value["oid"]]
                oid = "a" * 40
                return self._reply(200, {"commitUrl": f"{hub.base}/datasets/{m[1]}/commit/{oid}",
                                         "commitOid": oid, "success": True})  # fmt: skip
            hub.unexpected.append(f"{method} {self.path}")
            return self._reply(404, {"error": f"not implemented by the test hub: {method} {path}"})

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def do_PUT(self):
            self._handle("PUT")

    return Handler


@pytest.fixture
def hub_server(monkeypatch):
    def start(lfs: bool = False) -> RecordingHub:
        hub = RecordingHub(lfs)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
        server.daemon_threads = True
        hub.base = f"http://127.0.0.1:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.daemon = True
        thread.start()
        servers.append((server, thread))
        monkeypatch.setenv("HF_ENDPOINT", hub.base)
        return hub

    servers: list = []
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive()


STAGES = [
    {"type": FAKE + "FakeGenerate", "name": "gen", "n": 3},
    {"type": FAKE + "FakeJudge", "name": "judge"},
    {"type": "pairs", "judge": "judge"},
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("push")
    run_dir, _ = run_recipe(tmp, PROMPTS, STAGES, ["preference", "kto"])
    return run_dir


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def _assert_no_token(*blobs) -> None:
    for blob in blobs:
        data = blob if isinstance(blob, bytes) else str(blob).encode()
        assert TOKEN.encode() not in data


def _text(result) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def _push(*args: str):
    return runner.invoke(app, ["push", *args])


def test_dry_run_writes_the_upload_folder(run_dir, tmp_path, hub_server):
    result = _push(str(run_dir), REPO, "--dry-run", "--format", "preference", "--format", "kto",
                   "--format", "pointwise", "--license", "apache-2.0", "--records")  # fmt: skip
    assert result.exit_code == 0, result.output
    folder = run_dir / "hub-upload"
    files = _files(folder)
    assert {"README.md", "recipe.yaml", "data/preference.parquet", "data/kto.parquet",
            "data/pointwise.parquet", "data/records.parquet", "report/report.md",
            "report/funnel.png"} <= set(files)  # fmt: skip
    from huggingface_hub import DatasetCard

    card = DatasetCard((folder / "README.md").read_text())
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0" and meta["task_categories"] == ["text-generation"]
    configs = {c["config_name"]: c for c in meta["configs"]}
    assert list(configs) == ["preference", "kto", "pointwise", "records"]
    assert configs["preference"]["default"] is True
    for c in configs.values():
        assert c["data_files"][0]["path"] in files
    assert "![records and pairs per stage](report/funnel.png)" in card.text
    assert "## Run report" in card.text
    # the parquet the run wrote is uploaded as is; a format the run did not write is built
    assert (
        files["data/preference.parquet"] == (run_dir / "data" / "preference.parquet").read_bytes()
    )
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_files=str(folder / "data/pointwise.parquet"), split="train"
    )
    assert len(ds) == 3 * len(PROMPTS)
    _assert_no_token(*files.values(), result.output)
    # a second dry run replaces the default folder; a foreign non-empty folder is refused
    assert _push(str(run_dir), REPO, "--dry-run").exit_code == 0
    assert "data/pointwise.parquet" not in _files(folder)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    refused = _push(str(run_dir), REPO, "--dry-run", "--folder", str(tmp_path / "mine"))
    assert refused.exit_code == 1 and "exists and is not empty" in _text(refused)


@pytest.mark.parametrize("lfs", [False, True], ids=["regular-files", "lfs-files"])
def test_push_uploads_exactly_the_dry_run_folder(
    run_dir, tmp_path, hub_server, monkeypatch, caplog, lfs
):
    import huggingface_hub.constants

    hub = hub_server(lfs=lfs)
    if lfs:  # Xet storage cannot be faked locally; the Git LFS path is what it replaces
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    dry = tmp_path / "dry"
    assert _push(str(run_dir), REPO, "--dry-run", "--folder", str(dry)).exit_code == 0
    assert hub.requests == []  # a dry run sends nothing
    caplog.set_level(logging.DEBUG)
    result = _push(str(run_dir), REPO, "--private")
    assert result.exit_code == 0, result.output
    assert f"pushed {len(_files(dry))} files to {hub.base}/datasets/{REPO}" in _text(result)
    assert hub.unexpected == []
    routes = {(r["method"], re.sub(r"[0-9a-f]{64}", "<oid>", r["path"])) for r in hub.requests}
    expected = {
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", f"/api/datasets/{REPO}/preupload/main"),
        ("POST", f"/api/datasets/{REPO}/commit/main"),
    }
    if lfs:
        expected |= {
            ("POST", f"/datasets/{REPO}.git/info/lfs/objects/batch"),
            ("PUT", "/lfs-upload/<oid>"),
        }
    assert routes == expected
    assert hub.created == [
        {"name": "prefs", "organization": "test-org", "visibility": "private", "type": "dataset"}
    ]
    assert all(
        r["auth"] == f"Bearer {TOKEN}"
        for r in hub.requests
        if not r["path"].startswith("/lfs-upload")
    )
    assert hub.files == _files(dry)  # byte for byte what the dry run wrote
    if lfs:
        assert {k for c in hub.commits for k in (i["key"] for i in c)} >= {"lfsFile", "file"}
        assert len(hub.blobs) == sum(p.endswith((".parquet", ".png")) for p in hub.files)
    else:
        assert all(i["key"] in ("header", "file") for c in hub.commits for i in c)
    header = hub.commits[0][0]
    assert header["key"] == "header" and "preference, kto" in header["value"]["summary"]
    # the token went only into Authorization headers
    _assert_no_token(result.output, caplog.text, *hub.files.values(),
                     *(r["body"] for r in hub.requests))  # fmt: skip
    for path in run_dir.parent.rglob("*"):
        if path.is_file():
            _assert_no_token(path.read_bytes())


@pytest.fixture(scope="module")
def unscored_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unscored")
    run_dir, _ = run_recipe(tmp, PROMPTS[:2], [{"type": FAKE + "FakeGenerate"}], [])
    return run_dir


def test_bad_input_fails_before_any_upload(
    run_dir, unscored_run, tmp_path, hub_server, monkeypatch
):
    hub = hub_server()
    incomplete = tmp_path / "incomplete"
    shutil.copytree(run_dir, incomplete)
    (incomplete / "data" / "kto.parquet").unlink()
    cases = [
        ((str(incomplete), REPO), "is incomplete: the 'kto' output"),
        ((str(tmp_path / "missing"), REPO), "is not a directory"),
        ((str(unscored_run), REPO, "--format", "pointwise"),
         "format 'pointwise' needs judge scores, which the run did not produce"),
        ((str(unscored_run), REPO), "wrote no dataset format"),
        ((str(run_dir), REPO, "--format", "listwise"), "needs per-prompt rankings"),
        ((str(run_dir), REPO, "--format", "nope"), "unknown format(s) 'nope'"),
        ((str(run_dir), "not a/valid repo"), "malformed repository id 'not a/valid repo'"),
        ((str(run_dir), "a/b/c"), "malformed repository id"),
    ]  # fmt: skip
    for args, message in cases:
        result = _push(*args)
        assert result.exit_code == 1, (args, result.output)
        assert message in _text(result), (args, result.output)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))  # no saved login either
    result = _push(str(run_dir), REPO)
    assert result.exit_code == 1 and "no Hugging Face token" in _text(result)
    assert hub.requests == []


def test_a_token_inside_the_data_is_never_uploaded(tmp_path, hub_server):
    hub = hub_server()
    prompts = [{"id": "leak", "prompt": f"My token is {TOKEN}, keep it safe."}, *PROMPTS[:2]]
    run_dir, _ = run_recipe(tmp_path, prompts, STAGES, ["preference"])
    result = _push(str(run_dir), REPO)
    assert result.exit_code == 1
    assert "contains the Hugging Face token" in _text(result)
    _assert_no_token(result.output)
    assert hub.requests == []


# --- the data must belong to the recipe on the card ------------------------------------------------


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


def _refused(hub, run_dir: Path, *messages: str) -> None:
    for extra in ((), ("--dry-run", "--folder", str(run_dir.parent / "dry"))):
        result = _push(str(run_dir), REPO, *extra)
        assert result.exit_code == 1, result.output
        for message in messages:
            assert message in _text(result), result.output
        assert not (run_dir.parent / "dry").exists()
    assert hub.requests == []


def test_push_refuses_the_data_of_a_previous_recipe(run_dir, tmp_path, hub_server):
    """A rerun of an edited recipe rewrites run.json when it plans, then is killed: data/ and
    summary.json still hold the old recipe's dataset."""
    import copy as copying

    from synthpref.executor.common import plan_run
    from synthpref.recipes.loader import parse_recipe

    hub = hub_server()
    target = _copy(run_dir, tmp_path)
    raw = copying.deepcopy(json.loads((target / "run.json").read_text())["recipe"])
    raw["stages"][1]["mode"] = "inverse"  # the judge now prefers short answers
    plan_run(parse_recipe(raw, base_dir=run_dir.parent), target, fresh=False)
    _refused(hub, target, "summary.json", "run.json", "synthpref run RECIPE")


def test_push_refuses_data_files_changed_after_the_run(run_dir, tmp_path, hub_server):
    import pyarrow.parquet as pq

    hub = hub_server()
    target = _copy(run_dir, tmp_path)
    path = target / "data" / "preference.parquet"
    pq.write_table(pq.read_table(path).slice(0, 1), path)  # still valid Parquet, other rows
    _refused(hub, target, "data/preference.parquet", "changed")


def test_push_refuses_a_summary_without_file_fingerprints(run_dir, tmp_path, hub_server):
    hub = hub_server()
    target = _copy(run_dir, tmp_path)
    summary = json.loads((target / "summary.json").read_text())
    del summary["files"]
    (target / "summary.json").write_text(json.dumps(summary))
    _refused(hub, target, "summary.json", "synthpref run RECIPE")


# --- what leaves the machine -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("private")
    prompts = [
        {**p, "email": f"user{i}@example.com", "topic": f"topic-{i}"}
        for i, p in enumerate(PROMPTS[:4])
    ]
    run_dir, _ = run_recipe(tmp, prompts, STAGES, ["preference"])
    return run_dir


def _columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_schema(path).names


def _metadata(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [
        json.loads(m) for m in pq.read_table(path, columns=["metadata"])["metadata"].to_pylist()
    ]


def test_records_and_source_columns_stay_home_unless_asked(private_run, tmp_path, hub_server):
    from huggingface_hub import DatasetCard

    hub_server()
    folder = tmp_path / "default"
    assert _push(str(private_run), REPO, "--dry-run", "--folder", str(folder)).exit_code == 0
    files = _files(folder)
    assert "data/records.parquet" not in files
    assert not any(b"@example.com" in blob for blob in files.values())
    card = DatasetCard((folder / "README.md").read_text())
    assert [c["config_name"] for c in card.data.to_dict()["configs"]] == ["preference"]
    assert "`data/preference.parquet`" in card.text
    for column in _columns(folder / "data" / "preference.parquet"):
        assert f"`{column}`" in card.text

    with_records = tmp_path / "records"
    result = _push(str(private_run), REPO, "--dry-run", "--folder", str(with_records), "--records")
    assert result.exit_code == 0, result.output
    assert all(m == {} for m in _metadata(with_records / "data" / "records.parquet"))
    assert not any(b"@example.com" in blob for blob in _files(with_records).values())
    card = (with_records / "README.md").read_text()
    assert "`data/records.parquet`" in card and "source columns were left out" in card

    kept = tmp_path / "kept"
    result = _push(str(private_run), REPO, "--dry-run", "--folder", str(kept), "--records",
                   "--keep-metadata", "--drop-column", "metadata.email,chosen_model")  # fmt: skip
    assert result.exit_code == 0, result.output
    metadata = _metadata(kept / "data" / "records.parquet")
    assert {m["topic"] for m in metadata} == {f"topic-{i}" for i in range(4)}
    assert all("email" not in m for m in metadata)
    assert "chosen_model" not in _columns(kept / "data" / "preference.parquet")
    assert "rejected_model" in _columns(kept / "data" / "preference.parquet")
    card = (kept / "README.md").read_text()
    assert "`topic`" in card and "some source columns were left out" in card
    assert "`chosen_model`" not in card and "email" not in card  # left out, and not named


def test_column_choices_that_cannot_apply_are_refused(private_run, tmp_path, hub_server):
    hub = hub_server()
    cases = [
        (("--drop-column", "nope"), "unknown column 'nope'"),
        (("--drop-column", "metadata.email"), "--records"),
        (("--records", "--drop-column", "metadata.email"), "--keep-metadata"),
        (("--keep-metadata",), "--records"),
    ]
    for extra, message in cases:
        result = _push(str(private_run), REPO, "--dry-run", "--folder", str(tmp_path / "x"), *extra)
        assert result.exit_code == 1, (extra, result.output)
        assert message in _text(result), (extra, result.output)
        assert not (tmp_path / "x").exists()
    assert hub.requests == []

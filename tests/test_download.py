"""Tests for download.sh, run against a local fake of Meta's download server.

The fake server listens on 127.0.0.1 only, serves a tiny CodeLlama-7b tree,
honours HTTP Range requests (so ``wget --continue`` can resume) and can be told
per test to refuse, corrupt or replace files with an HTML page.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "download.sh"
BASH = shutil.which("bash")
WGET = shutil.which("wget")

pytestmark = pytest.mark.skipif(
    WGET is None or BASH is None,
    reason="download.sh needs wget and bash; install wget (apt-get install wget) to run these tests",
)

RUN_TIMEOUT_S = 15
QUERY = "Policy=abc&Signature=def"
EXPIRY_HINT = "llama-downloads"
VALID_MODELS = [
    "7b",
    "13b",
    "34b",
    "70b",
    "7b-Python",
    "13b-Python",
    "34b-Python",
    "70b-Python",
    "7b-Instruct",
    "13b-Instruct",
    "34b-Instruct",
    "70b-Instruct",
]

LICENSE = b"LLAMA 2 COMMUNITY LICENSE AGREEMENT (fake)\n"
USE_POLICY = b"# Llama 2 Acceptable Use Policy (fake)\n"
PTH = b"PK\x03\x04" + bytes(range(256)) * 16  # a .pth is a zip archive
PARAMS = b'{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 32016}\n'
TOKENIZER = b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02" + bytes(range(64))

PTH_PATH = "/CodeLlama-7b/consolidated.00.pth"
PARAMS_PATH = "/CodeLlama-7b/params.json"
TOKENIZER_PATH = "/CodeLlama-7b/tokenizer.model"

HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Access denied</title></head><body>Sign in</body></html>\n"
)
FORBIDDEN_BODY = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code></Error>'

# External tools download.sh runs (besides bash builtins and the md5 tool).
# The macOS test builds a PATH holding only these, so keep it in sync.
SCRIPT_TOOLS = ["wget", "head", "tr", "rm", "mkdir"]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def model_tree(model: str) -> dict[str, bytes]:
    """Files of a fake one-shard model, with a checklist.chk matching them."""
    files = {
        "consolidated.00.pth": PTH,
        "params.json": PARAMS,
        "tokenizer.model": TOKENIZER,
    }
    checklist = "".join(f"{md5(data)}  {name}\n" for name, data in files.items())
    files["checklist.chk"] = checklist.encode()
    return {f"/CodeLlama-{model}/{name}": data for name, data in files.items()}


def corrupted(data: bytes) -> bytes:
    """Same length and same first bytes (still looks like the file), wrong content."""
    return data[:2] + bytes(b ^ 0xFF for b in data[2:])


@dataclass
class FakeMetaServer:
    """State of the fake download server; tests change it before running the script."""

    url: str = ""
    home: Path = Path()  # HOME for the script, so no ~/.wgetrc is read
    files: dict[str, bytes] = field(default_factory=dict)
    forbidden: set[str] = field(default_factory=set)
    html: set[str] = field(default_factory=set)
    # path -> how many more times to serve it corrupted (-1: always)
    corrupt: dict[str, int] = field(default_factory=dict)
    # (path, Range header or None) for every request received
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ranges_for(self, path: str) -> list[str | None]:
        return [rng for p, rng in self.requests if p == path]


class Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        fake: FakeMetaServer = self.server.fake  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        path = parts.path
        range_header = self.headers.get("Range")
        with fake.lock:
            fake.requests.append((path, range_header))
            if parts.query != QUERY or path in fake.forbidden:
                self._send(403, FORBIDDEN_BODY, {"Content-Type": "application/xml"})
                return
            if path in fake.html:
                self._send(200, HTML_PAGE, {"Content-Type": "text/html"})
                return
            if path not in fake.files:
                self._send(404, b"Not Found\n", {"Content-Type": "text/plain"})
                return
            body = fake.files[path]
            remaining = fake.corrupt.get(path, 0)
            if remaining != 0:
                body = corrupted(body)
                if remaining > 0:
                    fake.corrupt[path] = remaining - 1

        octet = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if range_header and range_header.startswith("bytes="):
            first_s, _, last_s = range_header[len("bytes=") :].partition("-")
            first = int(first_s)
            if first >= len(body):
                self._send(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                return
            last = min(int(last_s), len(body) - 1) if last_s else len(body) - 1
            headers = {**octet, "Content-Range": f"bytes {first}-{last}/{len(body)}"}
            self._send(206, body[first : last + 1], headers)
            return
        self._send(200, body, octet)

    do_HEAD = do_GET


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FakeMetaServer]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "wgetrc").touch()
    fake = FakeMetaServer(
        home=home,
        files={"/LICENSE": LICENSE, "/USE_POLICY.md": USE_POLICY, **model_tree("7b")},
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.fake = fake  # type: ignore[attr-defined]
    port = httpd.server_address[1]
    fake.url = f"http://127.0.0.1:{port}/*?{QUERY}"
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield fake
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def target(tmp_path: Path) -> Path:
    return tmp_path / "models"


def run_download(
    server: FakeMetaServer,
    target: Path,
    models: str = "7b",
    *,
    path: str | None = None,
    cwd: Path | None = None,
    extra_env: dict[str, str] | None = None,
    prompt_input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run download.sh; stdout and stderr are merged.

    Without ``prompt_input`` the URL and models come from the environment and
    stdin is closed; with it, they are typed at the script's two prompts.
    """
    env = {
        "PATH": path if path is not None else os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(server.home),
        "WGETRC": str(server.home / "wgetrc"),
        "LC_ALL": "C",
        "no_proxy": "*",
        "TARGET_FOLDER": str(target),
        **(extra_env or {}),
    }
    if prompt_input is None:
        env |= {"PRESIGNED_URL": server.url, "MODEL_SIZE": models}
    assert BASH is not None
    return subprocess.run(
        [BASH, str(SCRIPT)],
        cwd=cwd or target.parent,
        env=env,
        stdin=subprocess.DEVNULL if prompt_input is None else None,
        input=prompt_input,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def assert_model_files(target: Path, model: str = "7b") -> None:
    for url_path, data in model_tree(model).items():
        assert (target / url_path.lstrip("/")).read_bytes() == data, url_path


def test_clean_download_of_7b_verifies_and_exits_zero(server: FakeMetaServer, target: Path) -> None:
    result = run_download(server, target)

    assert result.returncode == 0, result.stdout
    assert (target / "LICENSE").read_bytes() == LICENSE
    assert (target / "USE_POLICY.md").read_bytes() == USE_POLICY
    assert_model_files(target)
    assert "verified OK: CodeLlama-7b" in result.stdout
    assert "FAILED:      none" in result.stdout


def test_rerun_after_complete_download_is_a_no_op(server: FakeMetaServer, target: Path) -> None:
    assert run_download(server, target).returncode == 0
    server.requests.clear()

    result = run_download(server, target)

    assert result.returncode == 0, result.stdout
    assert_model_files(target)
    # Every file is only asked for past its end (HTTP 416), nothing is re-sent.
    assert server.requests and all(rng is not None for _, rng in server.requests)


def test_corrupted_file_is_redownloaded_and_then_verifies(
    server: FakeMetaServer, target: Path
) -> None:
    server.corrupt[PTH_PATH] = 1

    result = run_download(server, target)

    assert result.returncode == 0, result.stdout
    assert "re-download" in result.stdout
    assert_model_files(target)
    # The second fetch starts from scratch instead of continuing the bad file.
    assert server.ranges_for(PTH_PATH) == [None, None]


def test_file_corrupted_every_time_fails_naming_the_file(
    server: FakeMetaServer, target: Path
) -> None:
    server.corrupt[PARAMS_PATH] = -1

    result = run_download(server, target)

    assert result.returncode != 0
    assert "CodeLlama-7b/params.json" in result.stdout
    assert f"expected {md5(PARAMS)}, got {md5(corrupted(PARAMS))}" in result.stdout
    assert "FAILED:      CodeLlama-7b" in result.stdout


def test_failed_model_does_not_stop_the_other_models(server: FakeMetaServer, target: Path) -> None:
    server.files.update(model_tree("7b-Python"))
    server.corrupt[PARAMS_PATH] = -1

    result = run_download(server, target, models="7b,7b-Python")

    assert result.returncode != 0
    assert_model_files(target, "7b-Python")
    assert "verified OK: CodeLlama-7b-Python" in result.stdout
    assert "FAILED:      CodeLlama-7b\n" in result.stdout


def test_http_403_explains_url_expiry_and_leaves_no_file(
    server: FakeMetaServer, target: Path
) -> None:
    server.forbidden.add(PARAMS_PATH)

    result = run_download(server, target)

    assert result.returncode != 0
    assert "403" in result.stdout
    assert "expired" in result.stdout
    assert EXPIRY_HINT in result.stdout
    assert not (target / "CodeLlama-7b" / "params.json").exists()


def test_html_page_served_with_200_is_rejected(server: FakeMetaServer, target: Path) -> None:
    server.html.add(TOKENIZER_PATH)

    result = run_download(server, target)

    assert result.returncode != 0
    assert "CodeLlama-7b/tokenizer.model" in result.stdout
    assert "HTML" in result.stdout
    assert EXPIRY_HINT in result.stdout
    assert not (target / "CodeLlama-7b" / "tokenizer.model").exists()


def test_an_html_license_is_rejected_and_a_rerun_replaces_it(
    server: FakeMetaServer, target: Path
) -> None:
    server.html.add("/LICENSE")
    first = run_download(server, target)
    assert first.returncode != 0
    assert "LICENSE" in first.stdout and "HTML" in first.stdout
    (target / "LICENSE").write_text("<!DOCTYPE html><html>an old run's error page</html>")
    server.html.clear()
    second = run_download(server, target)
    assert second.returncode == 0, second.stdout
    assert (target / "LICENSE").read_bytes() == LICENSE


def test_interrupted_download_resumes_with_range_request(
    server: FakeMetaServer, target: Path
) -> None:
    half = len(PTH) // 2
    partial = target / "CodeLlama-7b" / "consolidated.00.pth"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(PTH[:half])

    result = run_download(server, target)

    assert result.returncode == 0, result.stdout
    assert server.ranges_for(PTH_PATH) == [f"bytes={half}-"]
    assert partial.read_bytes() == PTH


def test_unknown_model_name_lists_valid_names_and_downloads_nothing(
    server: FakeMetaServer, target: Path
) -> None:
    result = run_download(server, target, models="7b,8b")

    assert result.returncode != 0
    assert "8b" in result.stdout
    for name in VALID_MODELS:
        assert name in result.stdout
    assert server.requests == []
    assert not target.exists()


def test_url_without_star_is_rejected_before_downloading(
    server: FakeMetaServer, target: Path
) -> None:
    server.url = server.url.replace("*", "CodeLlama-7b/params.json")

    result = run_download(server, target)

    assert result.returncode != 0
    assert "'*'" in result.stdout
    assert server.requests == []


def test_url_and_models_can_be_typed_at_the_prompts(server: FakeMetaServer, target: Path) -> None:
    result = run_download(server, target, prompt_input=f"  {server.url}  \n7b\n")

    assert result.returncode == 0, result.stdout
    assert_model_files(target)


def test_closed_stdin_without_env_vars_downloads_nothing(
    server: FakeMetaServer, target: Path
) -> None:
    result = run_download(server, target, prompt_input="")

    assert result.returncode != 0
    assert "PRESIGNED_URL" in result.stdout
    assert server.requests == []


def test_target_folder_env_var_is_honoured(server: FakeMetaServer, tmp_path: Path) -> None:
    target = tmp_path / "nested" / "dir with spaces"
    workdir = tmp_path / "cwd"
    workdir.mkdir()

    result = run_download(server, target, cwd=workdir)

    assert result.returncode == 0, result.stdout
    assert (target / "LICENSE").read_bytes() == LICENSE
    assert_model_files(target)
    assert list(workdir.iterdir()) == []


def write_fake_md5(bin_dir: Path, log: Path) -> None:
    """A stand-in for macOS ``md5 -r FILE``, which prints ``<hash> <file>``."""
    script = bin_dir / "md5"
    script.write_text(
        f"#!{sys.executable}\n"
        "import hashlib, sys\n"
        "args = sys.argv[1:]\n"
        "assert args[0] == '-r', args\n"
        f"open({str(log)!r}, 'a').write(' '.join(args) + '\\n')\n"
        "for name in args[1:]:\n"
        "    with open(name, 'rb') as f:\n"
        "        print(hashlib.md5(f.read()).hexdigest(), name)\n"
    )
    script.chmod(0o755)


def test_macos_md5_is_used_when_md5sum_is_missing(server: FakeMetaServer, tmp_path: Path) -> None:
    target = tmp_path / "models"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in SCRIPT_TOOLS:
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    md5_log = tmp_path / "md5.log"
    write_fake_md5(bin_dir, md5_log)

    result = run_download(server, target, path=str(bin_dir))

    assert result.returncode == 0, result.stdout
    assert "with md5" in result.stdout
    assert_model_files(target)
    assert md5_log.read_text().count("-r ") == 3  # one per checklist entry


def test_md5_tool_can_be_forced_with_env_var(server: FakeMetaServer, tmp_path: Path) -> None:
    target = tmp_path / "models"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    md5_log = tmp_path / "md5.log"
    write_fake_md5(bin_dir, md5_log)
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"

    result = run_download(server, target, path=path, extra_env={"CODELLAMA_MD5_TOOL": "md5"})

    assert result.returncode == 0, result.stdout
    assert md5_log.read_text().count("-r ") == 3


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_the_usage_and_asks_for_nothing(flag: str, tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(SCRIPT), flag], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, cwd=tmp_path, timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "PRESIGNED_URL" in proc.stdout and "MODEL_SIZE" in proc.stdout
    assert not proc.stdout.startswith("#") and "Enter the URL" not in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or written

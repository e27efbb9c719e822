"""Security: no secrets in the repository, a non-root container, verified data before use,
local-only test servers and pinned dependencies."""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from tasks.sources.resolve import download_and_extract
from tasks.sources.stl10 import Checksums
from tests.conftest import make_fake_stl10
from tests.http_server import MisbehavingServer
from tests.reliability.conftest import REPO

TOKEN_PATTERNS = {
    "AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "GitHub token": r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})\b",
    "GitLab token": r"\bglpat-[A-Za-z0-9_-]{20,}\b",
    "Slack token": r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b",
    "Prefect Cloud API key": r"\bpnu_[A-Za-z0-9]{30,}\b",
    "Google API key": r"\bAIza[0-9A-Za-z_-]{35}\b",
    "OpenAI-style key": r"\bsk-[A-Za-z0-9]{32,}\b",
    "private key": r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP )?PRIVATE KEY",
    "password or secret literal": (
        r"(?i:\b(?:password|passwd|secret|api[_-]?key|token)\b\s*[:=]\s*['\"][^'\"\s$<{]{8,}['\"])"
    ),
    "credentials in a URL": r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"$<{]{4,}@",
}
SCANNER = re.compile("|".join(f"(?P<p{i}>{p})" for i, p in enumerate(TOKEN_PATTERNS.values())))


def secrets_in(text: str) -> list[str]:
    names = list(TOKEN_PATTERNS)
    return [names[int(m.lastgroup[1:])] for m in SCANNER.finditer(text) if m.lastgroup]


def repository_files() -> list[Path]:
    """Tracked files plus new ones git does not ignore: what a commit could carry."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [REPO / name for name in listed.split("\0") if name and (REPO / name).is_file()]


# Each sample is split in two so that this file itself stays clean.
@pytest.mark.parametrize(
    "leak",
    [
        "AKIA" + "Q3EXAMPLE7KEY2AB",
        "token = 'ghp_" + "a" * 36 + "'",
        'PREFECT_API_KEY="pnu_' + "b" * 36 + '"',
        "password: 'hunter2" + "hunter2'",
        "-----BEGIN " + "OPENSSH PRIVATE KEY-----",
        "https://user:s3c" + "retpass@registry.example.com/",
    ],
)
def test_scanner_finds_typical_secrets(leak: str) -> None:
    assert secrets_in(f"x = 1\n{leak}\n")


def test_no_secret_in_the_repository() -> None:
    found = []
    files = repository_files()
    assert len(files) > 20
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="ignore")
        found += [f"{path.relative_to(REPO)}: {kind}" for kind in secrets_in(text)]
    assert found == []


def test_container_runs_as_a_non_root_user() -> None:
    text = (REPO / "infra" / "Dockerfile").read_text()
    users = re.findall(r"^\s*USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users, "the Dockerfile sets no USER: the container would run as root"
    final = users[-1].split(":")
    assert final[0] not in ("root", "0") and final[-1] not in ("root", "0"), users[-1]
    if final[0].isdigit():  # a numeric uid must be one the image creates
        assert re.search(rf"useradd\b[^\n]*--uid {final[0]}\b", text), final[0]


PUBLIC_HOSTS = {".".join("0000"), ":" * 2}  # spelled so that this file does not match itself


def test_test_servers_listen_on_loopback_only(http_server: MisbehavingServer) -> None:
    assert http_server.address[0] == "127.0.0.1"
    for path in (REPO / "tests").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in PUBLIC_HOSTS:
                pytest.fail(f"{path.relative_to(REPO)}:{node.lineno} binds a public address")
            if isinstance(node, ast.Tuple) and node.elts:
                first = node.elts[0]
                if isinstance(first, ast.Constant) and first.value == "" and len(node.elts) == 2:
                    pytest.fail(f"{path.relative_to(REPO)}:{node.lineno} binds every address")


def test_a_tampered_cached_file_is_verified_and_replaced(tmp_path: Path) -> None:
    """The cache trusts nothing it has not checked: a changed unlabeled_X.bin is not used."""
    fake = make_fake_stl10(n=12)
    sums = Checksums(tarball=None, members={"unlabeled_X.bin": fake.bin_md5})
    (tmp_path / "stl10_binary.tar.gz").write_bytes(fake.tarball)
    ref = download_and_extract("http://127.0.0.1:9/x.tar.gz", tmp_path, checksums=sums)
    cached = Path(ref.uri)
    tampered = bytearray(cached.read_bytes())
    tampered[100] ^= 0xFF
    cached.write_bytes(bytes(tampered))
    ref = download_and_extract("http://127.0.0.1:9/x.tar.gz", tmp_path, checksums=sums)
    assert Path(ref.uri).read_bytes() == fake.unlabeled and ref.fingerprint == fake.bin_md5


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_constraints_pin_every_dependency() -> None:
    lines = [
        line.strip()
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    pins = {}
    for line in lines:
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!_-]+", line), (
            f"not an exact pin: {line}"
        )
        pins[_name(line)] = line
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert _name(project["name"]) not in pins  # the project itself is installed from the tree
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    missing = [_name(r) for r in wanted if _name(r) not in pins]
    assert missing == []

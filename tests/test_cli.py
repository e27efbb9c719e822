"""The ``image-search`` command: options, clear errors without tracebacks, the main job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import build_parser, main
from flows.params import SearchParams


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_every_parameter_is_an_option() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()  # type: ignore[union-attr]
    for name in SearchParams.model_fields:
        assert "--" + name.replace("_", "-") in help_text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split-ratio", "1.5"], "--split-ratio = 1.5: Input should be less than 1"),
        (["--limit", "0"], "--limit = 0: Input should be greater than or equal to 1"),
        (["--k", "0"], "--k = 0: Input should be greater than or equal to 1"),
        (
            ["--backends", "annoy"],
            "--backends = 'annoy': Input should be 'cuml', 'sklearn', 'faiss' or 'numpy'",
        ),
        (["--limit", "many"], "'many' is not a valid value for --limit"),
    ],
)
def test_bad_parameters_exit_2_without_traceback(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["run", *args])
    except SystemExit as exc:  # argparse's own type errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_run_bad_source_is_a_clear_error(tmp_path: Path) -> None:
    proc = cli("run", "--source", "ftp://example.org/x.tar.gz", "--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert "image-search: error: Unsupported source 'ftp://example.org/x.tar.gz'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_output_folder_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = cli("run", "--source", "sample", "--out", str(blocker / "out"))
    assert proc.returncode == 1
    assert f"Output folder '{blocker / 'out'}' is not writable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert blocker.read_text() == "not a folder"


def test_main_job_on_sample(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = cli(
        "run", "--source", "sample", "--weights", "none", "--limit", "200", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "image-search finished. Outputs:" in proc.stdout
    assert f"results    {out / 'results.png'}" in proc.stdout
    compare = json.loads((out / "compare.json").read_text())
    assert compare["passed"] is True
    assert (out / "samples.png").stat().st_size > 10_000

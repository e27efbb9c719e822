"""The ``image-search`` command: options generated from the parameter model, clear errors
without tracebacks, a configured Prefect API checked before the run, and the main job, whose
pure functions' log lines reach the API."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.cli import main, parse
from flows.cli.environment import command_environment
from flows.local_api import DEFAULT_STARTUP_TIMEOUT, startup_timeout
from flows.params import SearchParams
from tasks.errors import option_name

REPO = Path(__file__).resolve().parents[1]


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_every_parameter_with_its_description(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: descriptions stay whole
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for name, field in SearchParams.model_fields.items():
        assert f"{option_name(name)} " in out, name
        assert field.description and field.description in out, name
    assert "--traceback" in out
    assert re.search(r"(?<![-\w])-k\b", out) is None  # every option is long, as documented


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split-ratio", "1.5"], "--split-ratio = 1.5: Input should be less than 1"),
        (["--split-ratio", "1"], "--split-ratio = 1: Input should be less than 1"),
        (["--split-ratio", "0"], "--split-ratio = 0: Input should be greater than 0"),
        (["--split-ratio", "-0.5"], "--split-ratio = -0.5: Input should be greater than 0"),
        (["--limit", "0"], "--limit = 0: Input should be greater than or equal to 1"),
        (["--limit", "-5"], "--limit = -5: Input should be greater than or equal to 1"),
        (["--k", "0"], "--k = 0: Input should be greater than or equal to 1"),
        (
            ["--backends", "faiss,annoy"],
            "--backends = annoy: Input should be "
            "'cuml', 'sklearn', 'faiss', 'numpy' or 'certified'",
        ),
        (["--limit", "many"], "--limit = many: Input should be a valid integer"),
        (["--precision", "fp8"], "--precision = fp8: Input should be 'float32' or 'bfloat16'"),
        (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (["--weights", ""], "--weights = '': String should have at least 1 character"),
    ],
)
def test_bad_parameters_exit_2_without_traceback(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "image-search" in err and "error: " in err
    assert "Traceback" not in err


def test_top_level_help_describes_each_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    described = {
        words[0]: " ".join(words[1:])
        for line in out.splitlines()
        if (words := line.split()) and words[0] in ("run", "query", "serve")
    }
    assert set(described) == {"run", "query", "serve"}
    assert "Index a collection" in described["run"]
    assert "nearest indexed images" in described["query"]
    assert "over HTTP" in described["serve"]


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "choose a command: run" in capsys.readouterr().err


def test_overlapping_folders_are_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x"
    assert main(["run", "--out", str(out), "--data-dir", str(out / "cache")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"image-search: error: invalid parameters:\n  The output folder {out} (--out) holds the "
        f"data cache {out / 'cache'} (--data-dir); choose two separate folders.\n"
    )
    assert not out.exists()


def test_none_words_and_comma_separated_lists() -> None:
    command = parse(["run", "--limit", "none", "--backends", "faiss,numpy", "--weights", "none"])
    assert (command.limit, command.backends, command.weights) == (None, ["faiss", "numpy"], "none")
    assert parse(["run", "--k", "5", "--k", "7", "--traceback"]).model_dump() == {
        **SearchParams(k=7).model_dump(),
        "traceback": True,
        "verbose": False,
    }


def test_environment_variables_named_like_parameters_change_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("k", "out", "limit", "source", "run"):
        monkeypatch.setenv(name, "9")
    assert (
        parse(["run"]).model_dump(exclude={"traceback", "verbose"}) == SearchParams().model_dump()
    )


@pytest.mark.parametrize(
    ("before", "during"),
    [(None, "tasks"), ("mylib", "mylib,tasks"), ("tasks, mylib", "tasks, mylib")],
)
def test_pure_function_loggers_are_added_to_prefects(
    before: str | None, during: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "PREFECT_LOGGING_EXTRA_LOGGERS"
    if before is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, before)
    with command_environment(verbose=False):
        assert os.environ[name] == during
    assert os.environ.get(name) == before


@pytest.mark.slow
def test_importing_the_command_line_leaves_prefect_unloaded() -> None:
    """The command line sets Prefect's logging variables before Prefect reads them."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys, flows.cli; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    modules = json.loads(done.stdout.replace("'", '"'))
    assert [m for m in modules if m == "prefect" or m.startswith("prefect.")] == []


def test_temporary_api_start_up_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ours unless the user set Prefect's setting; ours is far above Prefect's 20 s, which a
    first start on a fresh PREFECT_HOME nearly uses up."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as SETTING
    from prefect.settings import temporary_settings

    monkeypatch.delenv(SETTING.name, raising=False)
    assert startup_timeout() == DEFAULT_STARTUP_TIMEOUT >= 6 * SETTING.value()
    with temporary_settings({SETTING: 7}):
        assert startup_timeout() == 7


@pytest.mark.slow
def test_an_unexpected_error_shows_a_traceback_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None
) -> None:
    """A bug in a real process: its console output (Prefect's logs included) names the error
    and the option; in this process, ``--traceback`` lets the exception out."""
    from prefect.settings import PREFECT_API_URL

    bug = (
        "import sys, flows.image_search as flow\n"
        "def broken(names): raise KeyError('a bug')\n"
        "flow.choose_backends = broken\n"
        "from flows.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", bug, "run", "--source", "sample", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())},
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Encountered exception during execution: KeyError('a bug')" in done.stderr
    assert done.stderr.endswith(
        "image-search: error: unexpected KeyError: 'a bug'\n"
        "(run again with --traceback for the details)\n"
    )
    assert "Traceback" not in done.stderr + done.stdout

    import flows.image_search

    monkeypatch.setattr(flows.image_search, "choose_backends", lambda names: {}["a bug"])
    with pytest.raises(KeyError, match="a bug"):
        main(["run", "--source", "sample", "--out", str(out), "--traceback"])


# -- a configured Prefect API that does not answer -------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """An API URL whose listener accepts connections and never answers."""
    sock = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(sock.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    sock.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("kind", ["nothing-listens", "never-answers"])
def test_unreachable_api_is_named_with_its_setting(
    kind: str,
    silent_listener: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    prefect_harness: None,
) -> None:
    from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_API_URL, temporary_settings

    url = silent_listener if kind == "never-answers" else f"http://127.0.0.1:{_free_port()}/api"
    out = tmp_path / "out"
    started = time.monotonic()
    with temporary_settings({PREFECT_API_URL: url, PREFECT_API_REQUEST_TIMEOUT: 2}):
        code = main(["run", "--source", "sample", "--out", str(out)])
    elapsed = time.monotonic() - started
    err = capfd.readouterr().err
    assert code == 1, err
    assert elapsed < 10, elapsed
    if kind == "never-answers":
        assert f"The Prefect API at {url} (PREFECT_API_URL) did not answer within 2 s" in err
    else:
        assert f"Cannot reach the Prefect API at {url} (PREFECT_API_URL): " in err
    assert "point PREFECT_API_URL at a running one, or unset it" in err
    assert "Traceback" not in err
    assert not out.exists()


# -- the main job, with the pure functions' logs in the API ----------------------------------


@pytest.mark.slow
def test_main_job_on_sample_and_its_logs_in_the_api(tmp_path: Path, prefect_harness: None) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "out"
    env = {"PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_LOGGING_EXTRA_LOGGERS", None)
    args = ["--source", "sample", "--weights", "none", "--limit", "210", "--out", str(out)]
    proc = cli("run", *args, "--backends", "numpy", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "image-search finished. Outputs:" in proc.stdout
    assert f"results    {out / 'results.png'}" in proc.stdout
    compare = json.loads((out / "compare.json").read_text())
    assert compare["passed"] is True
    assert (out / "samples.png").stat().st_size > 10_000
    assert "Traceback" not in proc.stderr

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=20)
        (run,) = [r for r in runs if r.parameters.get("out") == str(out)]
        assert run.state is not None and run.state.is_completed()
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    # A line a pure function logged through its module logger, not through Prefect's.
    embedded = [log for log in logs if log.message.startswith("catalogued 210 images in ")]
    assert [log.name for log in embedded] == ["tasks.features.embed"], [
        (log.name, log.message) for log in logs
    ]
    assert embedded[0].task_run_id is not None  # attached to the embed task's run

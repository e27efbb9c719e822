"""The benchmark harness: a registry of cases, child processes, machine facts, the report.

A case is a function ``fn(quick: bool) -> dict`` registered under a name. Its dict has
``rows`` (list of flat dicts: the Markdown table), ``targets`` (list of ``{"target", "measured",
"met"}``) and ``raw`` (anything JSON). A case that cannot run here raises :class:`Skip` with
the reason. Each case runs in its own child process (:func:`run_child`), so its peak RSS and
its thread pools are its own; a case may start further children, one per backend and repeat.

Children run in their own session, so a Ctrl-C reaches only the harness, which then asks the
running child to stop (SIGINT: its ``with``/``finally`` clean-up runs) and kills it only after a
grace period. ``python -m benchmarks.run`` also points every child's temporary folders into one
scratch folder that it removes last, so not even a killed child leaves files behind.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.hardware import cpu_count

CaseFn = Callable[[bool], dict[str, Any]]

# The environment of every command a benchmark starts: no usage reports, HTTP(S) off this
# machine to a dead local proxy.
SEALED = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
}


class Skip(Exception):
    """This case (or backend) cannot run here; the message says why."""


@dataclass(frozen=True)
class Case:
    name: str
    target: str  # "module:function", imported in the child only
    description: str
    default: bool = True  # run when no case is named on the command line


CASES: dict[str, Case] = {}


def register(name: str, target: str, description: str, *, default: bool = True) -> None:
    """Add a case; ``target`` is ``"module:function"`` with ``function(quick) -> dict``."""
    CASES[name] = Case(name, target, description, default)


def resolve(target: str) -> Callable[..., Any]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def rss_mib() -> float:
    """Resident set size of this process now, MiB (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return 0.0


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process and its threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def thread_pools() -> list[dict[str, Any]]:
    """Native thread pools loaded in this process and the threads each is set to use."""
    from threadpoolctl import threadpool_info

    keep = ("user_api", "internal_api", "prefix", "version", "architecture", "num_threads")
    return [{k: p.get(k) for k in keep} for p in threadpool_info()]


# Seconds a stopped case gets to remove its temporary folders before it is killed. A case waits
# less than this for its own children (see ``stop``), so its clean-up always gets its turn.
GRACE_S = 60.0


def stop(proc: subprocess.Popen[Any], grace_s: float) -> None:
    """Ask ``proc`` to stop (SIGINT: Python runs its clean-up), wait ``grace_s``, then kill it.

    ``grace_s = 0`` kills at once: for children that own no files of their own.
    """
    try:
        if grace_s > 0 and proc.poll() is None:
            print(f"    stopping child {proc.pid}: it may clean up for {grace_s:.0f} s", flush=True)
            proc.send_signal(signal.SIGINT)
            proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    finally:  # also after a second Ctrl-C during the grace period
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_or_stop(proc: subprocess.Popen[Any], grace_s: float, timeout: float | None = None) -> int:
    """Wait for ``proc`` and return its exit code; on an interrupt, an error or ``timeout``
    here, :func:`stop` it first and then re-raise."""
    try:
        return proc.wait(timeout)
    except BaseException:
        stop(proc, grace_s)
        raise


def raise_interrupt_on_sigterm() -> None:
    """Let SIGTERM unwind like Ctrl-C, so ``with``/``finally`` clean-up runs on either."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def run_child(
    target: str,
    kwargs: dict[str, Any],
    timeout: float | None = None,
    grace_s: float = GRACE_S,
) -> dict[str, Any]:
    """Call ``target(**kwargs)`` in a fresh Python process; its dict plus its peak RSS.

    A :class:`Skip` in the child comes back as ``{"skipped": reason}``; any other error is
    raised here with the tail of the child's stderr. Interrupted here, the child is stopped
    with ``grace_s`` to clean up (see :func:`stop`).
    """
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        out, err = Path(tmp) / "result.json", Path(tmp) / "stderr.txt"
        spec = json.dumps({"target": target, "kwargs": kwargs, "out": str(out)})
        with open(err, "w") as stderr:  # a file, not a pipe: nothing to drain while stopping
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.harness", spec],
                stderr=stderr,  # kept for the error; stdout (progress) goes straight through
                cwd=Path(__file__).resolve().parent.parent,
                start_new_session=True,  # Ctrl-C reaches the harness only; it stops the child
            )
            code = wait_or_stop(proc, grace_s, timeout)
        if code != 0 or not out.exists():
            tail = err.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{target} failed in its child (exit {code}):\n{tail}")
        return json.loads(out.read_text())


def _child_main(spec_json: str) -> None:
    raise_interrupt_on_sigterm()
    # The harness stops a child with SIGINT; honour it even if the harness was started with
    # SIGINT ignored (a background job of a script), which children would otherwise inherit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    spec = json.loads(spec_json)
    try:
        result = resolve(spec["target"])(**spec["kwargs"])
    except Skip as exc:
        result = {"skipped": str(exc)}
    result.setdefault("peak_rss_mib", round(peak_rss_mib(), 1))
    Path(spec["out"]).write_text(json.dumps(result, default=_jsonable))


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import numpy as np

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cores_available": cpu_count(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        fields = dict(
            (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lscpu.splitlines())
        )
        for key in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache"):
            info[key] = fields.get(key)
        info["avx512f"] = "avx512f" in fields.get("Flags", "").split()
    except OSError:  # pragma: no cover - no lscpu
        pass
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError):  # pragma: no cover
        pass
    for mod in ("sklearn", "faiss"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except ImportError:
            info[mod] = None
    # In a child, so that importing FAISS here does not disturb anything measured later.
    info["numpy_blas"] = run_child("benchmarks.harness:_numpy_blas", {})["pools"]
    return info


def _numpy_blas() -> dict[str, Any]:
    import numpy  # noqa: F401 - loads its BLAS, nothing else

    return {"pools": thread_pools()}


def run_cases(names: list[str], quick: bool) -> list[dict[str, Any]]:
    """Run the named cases one after another, each in its own child; print progress."""
    results = []
    for name in names:
        case = CASES[name]
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {case.description}", flush=True)
        t0 = time.perf_counter()
        try:
            result = run_child(case.target, {"quick": quick})
        except RuntimeError as exc:  # a broken case is reported, the others still run
            result = {"error": str(exc)}
            traceback.print_exc()
        result = {"name": name, "description": case.description, **result}
        result["case_seconds"] = round(time.perf_counter() - t0, 2)
        note = result.get("skipped") or ("ERROR" if "error" in result else "done")
        print(f"    {note} in {result['case_seconds']} s", flush=True)
        results.append(result)
    return results


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def markdown(results: list[dict[str, Any]], info: dict[str, Any], command: str) -> str:
    """The report: machine, command, and per case its table, targets and skip reasons."""
    lines = ["# Benchmark results", "", f"Command: `{command}`", "", "## Machine", ""]
    for key, value in info.items():
        if key != "numpy_blas":
            lines.append(f"- {key}: {value}")
    for pool in info.get("numpy_blas", []):
        lines.append(
            f"- NumPy {pool['user_api']}: {pool['prefix']} {pool['version']} "
            f"({pool.get('architecture')} kernel, {pool['num_threads']} threads)"
        )
    for result in results:
        lines += ["", f"## {result['name']}", "", str(result.get("description", "")), ""]
        if "skipped" in result:
            lines.append(f"Skipped: {result['skipped']}")
            continue
        if "error" in result:
            lines += ["Failed:", "", "```", result["error"][-2000:], "```"]
            continue
        rows = result.get("rows", [])
        if rows:
            keys = list(dict.fromkeys(k for row in rows for k in row))
            lines.append("| " + " | ".join(keys) + " |")
            lines.append("|" + "---|" * len(keys))
            for row in rows:
                lines.append("| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |")
            lines.append("")
        for t in result.get("targets", []):
            mark = "met" if t["met"] else "NOT met"
            lines.append(f"- {t['target']}: **{mark}** (measured {_cell(t['measured'])})")
        for note in result.get("notes", []):
            lines.append(f"- {note}")
        lines.append(f"- case wall time {result['case_seconds']} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # Through the package, so that `Skip` here is the class the cases raise (not __main__.Skip).
    from benchmarks.harness import _child_main as child_main

    child_main(sys.argv[1])

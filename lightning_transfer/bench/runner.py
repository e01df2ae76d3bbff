"""The runner: every job (one strategy or test-time method, one seed) in a subprocess of its own, one JSON row each.

Before anything runs, each job's config is resolved and the finished rows of earlier runs into the same ``--output``
are checked to be runs of the same jobs; one runner at a time holds an output. A runner stopped by a signal, or killed
outright, takes its worker with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning_transfer.bench.config import config_changes, input_files, resolved_config
from lightning_transfer.bench.row import environment, run_one


def run_jobs(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each job in a subprocess unless its row finished before; a job that dies leaves an error row."""
    _expected_configs(specs)
    finished = _finished_rows(specs)
    rows = []
    with _terminate_as_exit():
        for spec in specs:
            row_path, label = Path(spec["row"]), f"{spec['strategy']} seed {spec['seed']}"
            if str(row_path) in finished:
                print(f"bench: {label} done before, skipped", flush=True)
                rows.append(finished[str(row_path)])
                continue
            print(f"bench: {label} ...", flush=True)
            row_path.unlink(missing_ok=True)  # the error row of an earlier try: this try writes its own
            code = _run_worker(spec)
            if not row_path.is_file():  # the worker died before writing its row (killed, out of memory)
                write_json(row_path, {"strategy": spec["strategy"], "seed": spec["seed"], "status": "error",
                                      "error": f"worker exited with code {code} before recording a result"})
            rows.append(json.loads(row_path.read_text()))
    return rows


def _expected_configs(specs: list[dict[str, Any]]) -> None:
    """Resolve each job's config before anything runs (one parse per distinct job), into ``spec["expected"]``.

    A key or value the CLI rejects stops the runner here, naming the job, rather than failing in every worker."""
    from jsonargparse import ArgumentError

    parsed: dict[str, str] = {}
    for spec in specs:
        key = json.dumps([spec["configs"], spec["overrides"]])
        if key not in parsed:
            try:
                parsed[key] = resolved_config(spec["configs"], spec["overrides"], spec["seed"], Path(spec["workdir"]))
            except ArgumentError as err:
                raise SystemExit(f"bench: the config of {spec['strategy']!r} ({' + '.join(spec['configs'])}, "
                                 f"overrides {spec['overrides']}) does not parse: {err}. Nothing has run.") from None
        spec["expected"] = parsed[key]


def _finished_rows(specs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The rows of earlier runs of these jobs that finished, by row path, after checking they are runs of these jobs.

    A finished row whose config or source checkpoint differs from what this command would run stops the runner
    before anything runs: reusing it would put another experiment's numbers in this table, and rerunning it would
    overwrite a result. A row that cannot be read (a run killed mid-write, by an older version) is set aside."""
    finished, stale = {}, []
    for spec in specs:
        path = Path(spec["row"])
        if not path.is_file():
            continue
        try:
            row = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            kept = path.with_name(path.name + ".unreadable")
            os.replace(path, kept)
            print(f"bench: {path} could not be read ({err}); moved to {kept.name}, the run is done again", flush=True)
            continue
        if row.get("status") != "ok":
            continue  # failed before: run again
        changes = config_changes(row.get("config") or "{}", spec["expected"])
        now = input_files(spec["expected"])  # files named by both: the same file (a file made by a run is not)
        changes += [f"{key}: {used} -> {now[key]}" for key, used in (row.get("input_files") or {}).items()
                    if key in now and now[key] != used]
        if spec.get("kind") == "tta" and row.get("source", spec["source"]) != spec["source"]:
            changes.append(f"--ckpt_path: {row.get('source') or 'none'} -> {spec['source'] or 'none'}")
        if changes:
            stale.append(f"  {path.name}: {'; '.join(changes[:4])}" + (" ..." if len(changes) > 4 else ""))
        finished[str(path)] = row
    if stale:
        raise SystemExit("bench: the output folder holds finished runs of these jobs with other settings or input "
                         "files; nothing has run, nothing is overwritten:\n" + "\n".join(stale) + "\nUse a new "
                         "--output, or move those row files out of rows/ to run them again with these settings.")
    return finished


@contextlib.contextmanager
def only_runner(out: Path) -> Iterator[None]:
    """Hold ``out/.bench.lock`` while running: a second bench into the same output stops before anything runs, rather
    than running the same jobs a second time beside the first (both writing the same rows and checkpoints, each
    slowing the other's timings). The lock goes with the process, however it ends."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".bench.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise SystemExit(f"bench: {out} is in use by another bench run ({holder}): wait for it to end, or use "
                             "another --output. Nothing has run.") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        yield


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP end the runner with SystemExit, so the ``finally`` that stops the current worker runs (a
    worker left behind would go on training and write its row into a folder a rerun is using)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_worker(spec: dict[str, Any]) -> int:
    proc = subprocess.Popen(_worker_command(spec), env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            preexec_fn=_die_with_runner if sys.platform.startswith("linux") else None)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:  # the runner is stopping (Ctrl-C, SIGTERM): stop the worker with it
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _worker_command(spec: dict[str, Any]) -> list[str]:
    worker_spec = {k: v for k, v in spec.items() if k != "expected"}
    worker_spec["input_files"] = input_files(spec["expected"]) if "expected" in spec else {}
    return [sys.executable, "-m", "lightning_transfer", "bench", "--worker", json.dumps(worker_spec)]


def _die_with_runner() -> None:
    """In the worker, before it starts (Linux): SIGTERM when the runner dies, however it dies. A runner killed with
    SIGKILL (or by the out-of-memory killer) runs no ``finally``; its worker would go on training and write its row
    while a rerun into the same output ran the same job again."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def worker(argv: list[str]) -> None:
    """``bench --worker SPEC``, in the job's own process: run the job described by the JSON ``SPEC`` and write its row
    (metrics and provenance, or the error and its traceback) to ``SPEC["row"]``."""
    spec = json.loads(argv[0])
    row: dict[str, Any] = {"strategy": spec["strategy"], "seed": spec["seed"], **environment(),
                           "input_files": spec.get("input_files", {})}
    if spec.get("kind") == "tta":
        row["source"] = spec["source"]  # the --ckpt_path given (None: the source model was fitted here)
    try:
        if spec.get("kind") == "tta":
            from lightning_transfer.bench.test_time import run_tta

            row.update(run_tta(spec["configs"], spec["overrides"], spec["seed"], Path(spec["workdir"]), spec["ckpt"],
                               spec["fit"]))
        else:
            row.update(run_one(spec["configs"], spec["overrides"], spec["seed"], Path(spec["workdir"])))
        row["status"] = "ok"
    except (Exception, SystemExit) as err:  # recorded in the row; the other strategies go on
        row.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    write_json(Path(spec["row"]), row)


def write_json(path: Path, value: Any) -> None:
    """Write whole or not at all: a run killed mid-write leaves the previous file (or none), never half of one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1, default=str))
    os.replace(partial, path)

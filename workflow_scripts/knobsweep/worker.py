"""A persistent model worker: one process per run and model loads the model once and runs the cell and
importance jobs' GPU work one request at a time, so a cell job costs no model load.

Why: every cell is its own Snakemake job (one shard per cell, per-cell invalidation). Without a worker each
job starts Python, imports torch and transformers and loads the model: 10-15 s for the tiny demo model on
a CPU, tens of seconds per cell for a 60 GB model on a GPU.

How:
- The client is the cell or importance step script (`run_cell_in_worker`, `importance_in_worker`). It never
  imports torch. It connects to the worker's Unix socket (`multiprocessing.connection`, with an authkey),
  starting the worker first when none answers (an `fcntl.flock` lock file makes sure two clients never
  start two), sends one request and receives the log lines of the task (written to the job's log) and
  then the result or the error. The CLIENT writes the shard or importance file, atomically as always: the
  worker writes no result, so a killed client never leaves a late shard behind.
- The worker (`python -m knobsweep.worker serve ...`, its own session, output to a log file) loads the
  model on its first request and keeps it. It is keyed by the working directory and the model (resolved
  path, every file's size and mtime, config.json's sha256, dtype, device, implementations,
  trust_remote_code): another model or a rebuilt one gets another worker. Between samples it checks
  whether its client is still there; when the client is gone (killed by Snakemake, SIGKILL) it abandons the
  request within one sample, resets the knobs and waits for the next. After a task that raised it sends
  the error back and exits (the next request starts a fresh worker). It exits after `idle_s` seconds
  without a request and on a shutdown request (the Snakefile's onsuccess/onerror handlers). While a
  worker lives it holds an "alive" lock, and a new worker for the same socket starts only once the old one
  has gone, so the model is never loaded twice on one GPU.

Files, in a private directory under the system's temporary directory (`SOCKET_DIR`; Unix socket paths are
limited to about 107 bytes): `<name>.sock`, `<name>.key` (the authkey, mode 0600), `<name>.start.lock`,
`<name>.alive.lock`; `<name>` is 16 hex digits: 8 from the working directory (so a run's workers can be
found) and 8 from the working directory and the model key together.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import AuthenticationError, Client, Connection, Listener
from pathlib import Path
from typing import Any

from knobsweep.cells import Abandoned

log = logging.getLogger("knobsweep.worker")  # also when run as __main__

SOCKET_DIR = Path(tempfile.gettempdir()) / f"knobsweep-{os.getuid()}"
START_TIMEOUT_S = 120.0  # the worker binds its socket before importing torch: this is Python's start-up
CONNECT_ATTEMPTS = 3  # a request the worker never acknowledged (it was idling out just then) is resent
LOG_TAIL_CHARS = 3000
# Environment that decides which devices a process may use: a job with other values needs its own worker.
# SLURM_JOB_ID: jobs in different allocations never share a worker.
DEVICE_ENVIRONMENT = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "SLURM_JOB_ID")
# The SLURM allocation the Snakemake run itself lives in ("" for none), set by the Snakefile when the run
# starts and inherited by its jobs (the SLURM executor submits with --export=ALL). See `job_has_own_allocation`.
RUN_ALLOCATION_VARIABLE = "KNOBSWEEP_RUN_SLURM_JOB_ID"


def job_has_own_allocation() -> bool:
    """True when this job runs in a SLURM allocation that the run does not live in (the SLURM executor:
    one allocation per job). Its worker can serve no other job, and would outlive the job on a cluster
    without cgroup process tracking, so it exits after the request. A run started inside an allocation
    (sbatch, salloc, srun) keeps one worker for all its jobs there: one model load for the whole sweep."""
    job = os.environ.get("SLURM_JOB_ID")
    return bool(job) and os.environ.get(RUN_ALLOCATION_VARIABLE) != job


# --- names and keys -----------------------------------------------------------------------------------


def model_key(model_path: str, device: str, runtime: dict[str, Any]) -> dict[str, Any]:
    """What the loaded model is: a request with another key needs another worker."""
    path = Path(model_path).resolve()
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"model.path: {path} has no config.json")
    files = sorted(
        (p.name, st.st_size, st.st_mtime_ns) for p in path.iterdir() if p.is_file() for st in [p.stat()]
    )
    return {
        "model_path": str(path),
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
        "files": [list(f) for f in files],
        "dtype": runtime["dtype"],
        "device": device,
        "attn_implementation": runtime["attn_implementation"],
        "experts_implementation": runtime["experts_implementation"],
        "inference_path": runtime.get("inference_path", "auto"),
        "trust_remote_code": bool(runtime["trust_remote_code"]),
        "environment": {name: os.environ.get(name) for name in DEVICE_ENVIRONMENT},
    }


def short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def worker_name(cwd: str | os.PathLike, key: dict[str, Any]) -> str:
    cwd = str(Path(cwd).resolve())
    return short_hash(cwd) + short_hash([cwd, key])


class WorkerPaths:
    def __init__(self, name: str, directory: Path | None = None):
        directory = directory or SOCKET_DIR
        self.name = name
        self.socket = directory / f"{name}.sock"
        self.authkey = directory / f"{name}.key"
        self.start_lock = directory / f"{name}.start.lock"
        self.alive_lock = directory / f"{name}.alive.lock"


def private_dir() -> Path:
    """SOCKET_DIR, created mode 0700; refused when another user owns it or others can enter it."""
    SOCKET_DIR.mkdir(mode=0o700, exist_ok=True)
    st = SOCKET_DIR.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(
            f"model worker directory {SOCKET_DIR} is not private to this user (owner uid {st.st_uid}, "
            f"mode {oct(st.st_mode & 0o777)}): remove it or set inference.model_worker: false"
        )
    return SOCKET_DIR


def _authkey(paths: WorkerPaths) -> bytes:
    """The socket's authkey (created once, mode 0600; kept across workers of one name)."""
    if not paths.authkey.exists():
        tmp = paths.authkey.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        os.replace(tmp, paths.authkey)
    return paths.authkey.read_bytes()


@contextlib.contextmanager
def _flock(path: Path, timeout_s: float | None = None) -> Iterator[None]:
    """An exclusive flock on `path` (waiting at most `timeout_s`; None: as long as it takes)."""
    with open(path, "a") as f:
        if timeout_s is None:
            fcntl.flock(f, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{path} stayed locked for {timeout_s:.0f} s") from None
                    time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- client -------------------------------------------------------------------------------------------


def _try_connect(paths: WorkerPaths) -> Connection | None:
    """A connection to a live worker, or None when none answers (no socket, a dead worker's socket, a
    worker exiting right now)."""
    if not paths.socket.exists() or not paths.authkey.exists():
        return None
    try:
        return Client(str(paths.socket), "AF_UNIX", authkey=paths.authkey.read_bytes())
    except (OSError, EOFError, AuthenticationError):
        return None


def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return text[-LOG_TAIL_CHARS:]


def _start_worker(paths: WorkerPaths, key: dict[str, Any], idle_s: float, log_path: Path) -> Connection:
    """Start a worker and return a connection to it; the caller holds the start lock."""
    # A worker that is still exiting (after a failed task, or idling out) must be gone first: it may hold
    # the model on the GPU.
    with _flock(paths.alive_lock, timeout_s=max(START_TIMEOUT_S, idle_s + 30)):
        pass
    paths.socket.unlink(missing_ok=True)  # left by a killed worker
    _authkey(paths)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    command = [
        sys.executable,
        "-m",
        "knobsweep.worker",
        "serve",
        "--socket",
        str(paths.socket),
        "--idle-s",
        repr(float(idle_s)),
        "--key",
        json.dumps(key, sort_keys=True),
    ]
    with open(log_path, "ab") as out:
        # Its own session: Snakemake killing a job's process group must not kill the shared worker.
        # No inherited descriptors (close_fds): a job's output pipe must close when the job ends.
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=os.getcwd(),
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    log.info("started model worker pid %d (log %s)", process.pid, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        conn = _try_connect(paths)
        if conn is not None:
            return conn
        code = process.poll()
        if code is not None:
            raise RuntimeError(
                f"the model worker exited with code {code} during start-up; the end of its log "
                f"{log_path}:\n{_log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(
                f"the model worker did not answer within {START_TIMEOUT_S:.0f} s; the end of its log "
                f"{log_path}:\n{_log_tail(log_path)}"
            )
        time.sleep(0.05)


def worker_log(key: dict[str, Any], log_dir: str | os.PathLike | None = None) -> Path:
    """The log file of this working directory's worker for `key` (in `log_dir`, else next to its socket)."""
    return Path(log_dir or SOCKET_DIR).resolve() / f"model_worker_{worker_name(os.getcwd(), key)}.log"


def connect(key: dict[str, Any], *, idle_s: float, log_path: Path) -> Connection:
    """A connection to this working directory's worker for `key`, started if none answers."""
    paths = WorkerPaths(worker_name(os.getcwd(), key), private_dir())
    conn = _try_connect(paths)
    if conn is not None:
        return conn
    with _flock(paths.start_lock):
        conn = _try_connect(paths)  # another client may have started it meanwhile
        if conn is not None:
            return conn
        return _start_worker(paths, key, idle_s, log_path)


def request(
    task: str,
    payload: dict[str, Any],
    *,
    what: str,
    key: dict[str, Any],
    idle_s: float,
    log_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run `task` ("cell" or "importance") in the worker and return its result; the task's log lines go to
    this process's logging. Raises RuntimeError naming `what` and carrying the worker's message."""
    log_path = worker_log(key, log_dir)
    for _attempt in range(CONNECT_ATTEMPTS):
        conn = connect(key, idle_s=idle_s, log_path=log_path)
        with conn:
            try:
                conn.send((task, key, payload))
                reply = conn.recv()
            except (OSError, EOFError):
                continue  # not acknowledged: the worker was exiting (idle or shutdown); nothing ran
            if reply[0] != "accepted":
                raise RuntimeError(f"{what}: unexpected reply from the model worker: {reply!r}")
            pid = reply[1]["pid"]
            while True:
                try:
                    message = conn.recv()
                except (OSError, EOFError):
                    raise RuntimeError(
                        f"{what}: the model worker (pid {pid}) died during the task; the end of its log "
                        f"{log_path}:\n{_log_tail(log_path)}"
                    ) from None
                kind = message[0]
                if kind == "log":
                    _, name, level, text = message
                    logging.getLogger(name).log(level, "[model worker] %s", text)
                elif kind == "result":
                    if job_has_own_allocation():  # this worker serves no other job: let it go
                        paths = WorkerPaths(worker_name(os.getcwd(), key), SOCKET_DIR)
                        _send(paths, ("shutdown", str(Path.cwd().resolve())), {})
                    return message[1]
                elif kind == "error":
                    _, error_type, error_message, error_traceback = message
                    raise RuntimeError(
                        f"{what}: failed in the model worker (pid {pid}): {error_type}: {error_message}\n"
                        f"worker traceback:\n{error_traceback}"
                    )
                else:
                    raise RuntimeError(f"{what}: unexpected message from the model worker: {kind!r}")
    raise RuntimeError(f"{what}: the model worker did not take the request ({CONNECT_ATTEMPTS} attempts)")


def run_cell_in_worker(
    spec: dict[str, Any],
    *,
    model_path: str,
    device: str,
    manifest_path: str,
    importance_path: str,
    out_path: str,
    progress_every_s: float = 30.0,
    threads: int = 1,
    idle_s: float = 60.0,
    log_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """`knobsweep.cells.run_cell_job` with the model kept loaded in the worker; this process writes the
    shard. Returns the provenance written."""
    from knobsweep.cells import finish_cell
    from knobsweep.knobs import KnobSetting

    started = time.monotonic()
    what = f"{spec['workload']} {KnobSetting(**spec['knobs']).cell_id()}"
    key = model_key(model_path, device, spec["runtime"])
    payload = {
        "spec": spec,
        "manifest_path": str(Path(manifest_path).resolve()),
        "importance_path": str(Path(importance_path).resolve()),
        "progress_every_s": progress_every_s,
        "threads": threads,
        "what": what,
    }
    result = request("cell", payload, what=what, key=key, idle_s=idle_s, log_dir=log_dir)
    return finish_cell(
        spec,
        result["rows"],
        result["kept_blocks"],
        model_path=model_path,
        device=device,
        manifest_path=manifest_path,
        importance_path=importance_path,
        out_path=out_path,
        load_s=result["load_s"],
        warmup_s=result["warmup_s"],
        samples_s=result["samples_s"],
        model_reused=result["model_reused"],
        started=started,
        device_label=result["device_name"],
        inference_path=result["inference_path"],
        vision_encoder=result["vision_encoder"],
        preprocess=result["preprocess"],
    )


def importance_in_worker(
    spec: dict[str, Any],
    *,
    model_path: str,
    device: str,
    manifest_path: str,
    out_path: str,
    progress_every_s: float = 30.0,
    threads: int = 1,
    idle_s: float = 60.0,
    log_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """`knobsweep.importance.importance_job` in the worker; this process writes the JSON."""
    from knobsweep.importance import write_importance

    started = time.monotonic()
    what = f"{spec['manifest']['workload']} importance"
    key = model_key(model_path, device, spec["runtime"])
    payload = {
        "spec": spec,
        "manifest_path": str(Path(manifest_path).resolve()),
        "progress_every_s": progress_every_s,
        "threads": threads,
        "what": what,
    }
    result = request("importance", payload, what=what, key=key, idle_s=idle_s, log_dir=log_dir)
    return write_importance(
        result["importance"],
        spec,
        model_path=model_path,
        device=device,
        manifest_path=manifest_path,
        out_path=out_path,
        load_s=result["load_s"],
        model_reused=result["model_reused"],
        started=started,
        device_label=result["device_name"],
    )


def run_gpu_job(
    job: str, spec: dict[str, Any], config: dict[str, Any], *, threads: int, **paths: str
) -> None:
    """One GPU job of the workflow, `cell` or `importance`, as its step script runs it: holding one of the run's GPUs
    (`gpu_slots`, set before torch starts), in the run's model worker (`inference.model_worker`), or with the model
    loaded in this process. `config`: the workflow's; `paths`: the job's input and output paths."""
    from knobsweep.gpu_slots import gpu_slot

    if job not in ("cell", "importance"):
        raise ValueError(f"unknown GPU job {job!r}: cell or importance")
    inference = config["inference"]
    arguments = {
        "model_path": config["model"]["path"].rstrip("/"),
        "device": config["model"]["device"],
        **paths,
        "progress_every_s": inference["progress_every_s"],
    }
    with gpu_slot():
        if inference["model_worker"]:
            in_worker = run_cell_in_worker if job == "cell" else importance_in_worker
            in_worker(
                spec,
                **arguments,
                threads=threads,
                idle_s=inference["worker_idle_s"],
                log_dir=f"logs/{config['run']}",
            )
            return
        import torch

        if job == "cell":
            from knobsweep.cells import run_cell_job as in_process
        else:
            from knobsweep.importance import importance_job as in_process
        torch.set_num_threads(threads)
        in_process(spec, **arguments)


def _send(paths: WorkerPaths, message: tuple, replies: dict[str, Any]) -> None:
    try:
        with Client(str(paths.socket), "AF_UNIX", authkey=paths.authkey.read_bytes()) as conn:
            conn.send(message)
            replies[paths.name] = conn.recv()
            if replies[paths.name][0] == "accepted":
                replies[paths.name] = conn.recv()
    except Exception as e:  # noqa: BLE001 - a worker that cannot be reached needs no shutdown
        replies[paths.name] = ("unreachable", repr(e))


def _message_workers(cwd: str | os.PathLike | None, message: tuple, timeout_s: float) -> dict[str, Any]:
    """Send `message` to every worker of `cwd` (in parallel; a busy worker answers only after its task, so
    at most `timeout_s` is spent waiting). Returns {name: reply}."""
    if not SOCKET_DIR.is_dir():
        return {}
    prefix = short_hash(str(Path(cwd or os.getcwd()).resolve()))
    replies: dict[str, Any] = {}
    threads = []
    for socket_path in sorted(SOCKET_DIR.glob(f"{prefix}*.sock")):
        paths = WorkerPaths(socket_path.stem, SOCKET_DIR)
        thread = threading.Thread(target=_send, args=(paths, message, replies), daemon=True)
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return dict(replies)


def shutdown_workers(cwd: str | os.PathLike | None = None, timeout_s: float = 2.0) -> int:
    """Ask the model workers started from `cwd` (default: here) to exit; returns how many agreed. Fast and
    never raises (the Snakefile's onsuccess/onerror handlers call it). A busy worker, or one this cannot
    reach, exits on its own after its idle time."""
    try:
        cwd = str(Path(cwd or os.getcwd()).resolve())
        replies = _message_workers(cwd, ("shutdown", cwd), timeout_s)
        return sum(1 for reply in replies.values() if reply and reply[0] == "ok")
    except Exception as e:  # noqa: BLE001 - a shutdown helper must never fail a run
        log.warning("model worker shutdown: %r", e)
        return 0


def worker_status(cwd: str | os.PathLike | None = None, timeout_s: float = 2.0) -> dict[str, Any]:
    """{name: status} of the workers of `cwd` that answer within `timeout_s` (pid, model loaded, tasks)."""
    replies = _message_workers(cwd, ("ping",), timeout_s)
    return {name: reply[1] for name, reply in replies.items() if reply and reply[0] == "pong"}


# --- worker -------------------------------------------------------------------------------------------


class _Idle(Exception):
    pass


class _Forward(logging.Handler):
    """Sends the task's log records to the client; notes when the client is gone."""

    def __init__(self, conn: Connection):
        super().__init__(logging.INFO)
        self.conn, self.gone = conn, False

    def emit(self, record: logging.LogRecord) -> None:
        if self.gone:
            return
        try:
            self.conn.send(("log", record.name, record.levelno, record.getMessage()))
        except (OSError, ValueError):
            self.gone = True


def _peer_gone(conn: Connection) -> bool:
    """True when the client closed its end (it sends nothing while its task runs: readable means EOF)."""
    try:
        return conn.poll()
    except (OSError, EOFError, ValueError):
        return True


class Worker:
    def __init__(self, key: dict[str, Any], socket_path: Path, idle_s: float):
        self.key, self.socket_path, self.idle_s = key, socket_path, idle_s
        self.adapter: Any = None
        self.tasks = 0
        self.cwd = str(Path.cwd().resolve())

    def serve(self) -> int:
        paths = WorkerPaths(self.socket_path.stem, self.socket_path.parent)
        # Held until the process is gone (never closed here): the kernel releases it only after this
        # process, and the model it holds, have gone, so the next worker never loads a second copy.
        self.alive = open(paths.alive_lock, "a")  # noqa: SIM115
        try:
            fcntl.flock(self.alive, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.error("another model worker for %s is alive; exiting", self.socket_path)
            return 3
        self.socket_path.unlink(missing_ok=True)  # a killed worker's; no other worker is alive
        listener = Listener(str(self.socket_path), "AF_UNIX", backlog=16, authkey=_authkey(paths))
        log.info(
            "model worker pid %d listening on %s (idle timeout %.0f s; model %s on %s)",
            os.getpid(),
            self.socket_path,
            self.idle_s,
            self.key["model_path"],
            self.key["device"],
        )
        try:
            return self._loop(listener)
        finally:
            listener.close()  # removes the socket file

    def _accept(self, listener: Listener) -> Connection:
        """The next connection, or _Idle after idle_s seconds without one."""

        def expire(signum, frame):
            raise _Idle

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, self.idle_s)
        try:
            return listener.accept()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def _loop(self, listener: Listener) -> int:
        while True:
            try:
                conn = self._accept(listener)
            except _Idle:
                log.info("no request for %.0f s: exiting", self.idle_s)
                return 0
            except (OSError, EOFError, AuthenticationError) as e:
                log.warning("a connection failed before its request: %r", e)
                continue
            with conn:
                try:
                    message = conn.recv()
                except (OSError, EOFError):
                    continue
                outcome = self._handle(conn, message, listener)
            if outcome is not None:
                return outcome

    def _status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "cwd": self.cwd,
            "key": self.key,
            "model_loaded": self.adapter is not None,
            "tasks": self.tasks,
        }

    def _handle(self, conn: Connection, message: Any, listener: Listener) -> int | None:
        """Serve one request; returns an exit code to stop, None to go on."""
        kind = message[0] if isinstance(message, tuple) and message else None
        if kind == "ping":
            conn.send(("pong", self._status()))
            return None
        if kind == "shutdown":
            if message[1] != self.cwd:
                conn.send(("refused", f"worker of {self.cwd}"))
                return None
            conn.send(("ok", self._status()))
            log.info("shutdown requested: exiting")
            return 0
        if kind not in ("cell", "importance"):
            conn.send(("error", "ValueError", f"unknown request {kind!r}", ""))
            return None
        _, key, payload = message
        conn.send(("accepted", self._status()))
        forward = _Forward(conn)
        root = logging.getLogger()
        root.addHandler(forward)
        try:
            if key != self.key:
                raise ValueError(f"request for model {key} sent to the worker of {self.key}")
            result = self._run(kind, payload, lambda: forward.gone or _peer_gone(conn))
        except Abandoned:
            root.removeHandler(forward)
            log.info("%s: abandoned, the client is gone; the knobs are reset", payload.get("what"))
            return None
        except Exception as e:  # noqa: BLE001 - sent to the client, then this worker exits
            root.removeHandler(forward)  # the client gets the traceback once, with the error
            log.error("%s failed, exiting:\n%s", payload.get("what"), traceback.format_exc())
            listener.close()  # no new request may reach this worker any more
            with contextlib.suppress(OSError, ValueError):
                conn.send(("error", type(e).__name__, str(e), traceback.format_exc()))
            return 1
        finally:
            root.removeHandler(forward)
        try:
            conn.send(("result", result))
        except (OSError, ValueError):
            log.info("%s: the client left before the result; dropped", payload.get("what"))
        return None

    def _run(self, kind: str, payload: dict[str, Any], should_stop: Callable[[], bool]) -> dict[str, Any]:
        import torch

        from knobsweep.cells import device_name, load_adapter, run_loaded_cell
        from knobsweep.importance import importance_of_loaded

        torch.set_num_threads(int(payload["threads"]))
        what = payload["what"]
        spec = payload["spec"]
        model_reused = self.adapter is not None
        load_s = 0.0
        if not model_reused:
            key = self.key
            runtime = {
                "dtype": key["dtype"],
                "attn_implementation": key["attn_implementation"],
                "experts_implementation": key["experts_implementation"],
                "inference_path": key["inference_path"],
                "trust_remote_code": key["trust_remote_code"],
            }
            requested = {**spec["runtime"], "inference_path": spec["runtime"].get("inference_path", "auto")}
            if runtime != {k: requested[k] for k in runtime}:
                raise ValueError(f"{what}: the spec's runtime {spec['runtime']} differs from the worker's")
            self.adapter, load_s = load_adapter(
                runtime, model_path=key["model_path"], device=key["device"], what=what
            )
        else:
            log.info("%s: model reused (model worker pid %d, task %d)", what, os.getpid(), self.tasks + 1)
        self.tasks += 1
        if should_stop():
            raise Abandoned(what)
        common = {
            "load_s": load_s,
            "model_reused": model_reused,
            "device_name": device_name(self.key["device"]),
        }
        if kind == "cell":
            rows, kept_blocks = run_loaded_cell(
                self.adapter,
                spec,
                manifest_path=payload["manifest_path"],
                importance_path=payload["importance_path"],
                progress_every_s=payload["progress_every_s"],
                should_stop=should_stop,
            )
            return {
                **common,
                "rows": rows,
                "kept_blocks": list(kept_blocks),
                "warmup_s": rows.attrs["warmup_s"],
                "samples_s": rows.attrs["samples_s"],
                "inference_path": rows.attrs["inference_path"],
                "vision_encoder": rows.attrs["vision_encoder"],
                "preprocess": rows.attrs["preprocess"],
            }
        importance = importance_of_loaded(
            self.adapter,
            spec,
            manifest_path=payload["manifest_path"],
            progress_every_s=payload["progress_every_s"],
            should_stop=should_stop,
        )
        return {**common, "importance": importance}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m knobsweep.worker", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a model worker (started by the cell and importance jobs)")
    serve.add_argument("--socket", required=True, type=Path)
    serve.add_argument("--idle-s", required=True, type=float)
    serve.add_argument("--key", required=True, help="the model key (JSON)")
    stop = sub.add_parser("shutdown", help="ask the workers of a working directory to exit")
    stop.add_argument("--cwd", default=None)
    args = parser.parse_args(argv)
    if args.command == "shutdown":
        print(shutdown_workers(args.cwd), "model worker(s) shut down")
        return 0
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    return Worker(json.loads(args.key), args.socket, args.idle_s).serve()


if __name__ == "__main__":
    sys.exit(main())

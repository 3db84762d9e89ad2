"""A process that has imported torch and transformers once, and forks model processes on request.

Why: a model process (serve_app.model_worker) started with `python -m` spends ~3.3 of its ~3.4 s start
importing torch and transformers before it reads a single weight (measured on the tiny model, 2 cores).
A replica starts one at every start, hot swap, challenger and restart after a crash, so a crash costs
that long without a model, and a one-replica app answers 503 meanwhile. Forked from a process that has
already imported them, a start costs the weights' load and the warm-up.

    proc = start_child([sock.fileno()], title, ["serve_app.model_worker", "{fd0}", model_dir, options])
    proc.poll(); proc.wait(timeout=5); proc.kill()     # as subprocess.Popen, over a pidfd

One server per machine, user and Python environment: its socket lies in a folder only this user can
enter (`/tmp/sentiment-fork-server-<uid>`, mode 0700, checked before use), named by a hash of the
interpreter, the torch and transformers it preloads and this file. The first replica that needs it
starts it (under a file lock, so two replicas starting at once start one), detached from every replica
(see `main`); it leaves after IDLE_S without a request. The server imports no project module: a child
imports `serve_app.model_worker` itself, from the asking replica's `sys.path`, with the replica's
environment (CUDA_VISIBLE_DEVICES, test faults), stdout, stderr and working folder, so a fresh deploy
of changed code runs the new code.

A child is not the replica's child: the replica holds a pidfd of it (sent by the server, opened before
the server could reap it), which signals and waits without the race of a reused pid; its exit code is
the server's to reap, so `returncode` is None once it has exited. The child leaves when the replica
closes its socket or dies, exactly as a `python -m` one does. Where anything here fails (no pidfd, a
folder another user owns, a server that will not start), `start_child` raises ForkServerError and the
caller starts the process the plain way: this is an optimisation, never a new way to fail.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IDLE_S = 300.0  # the server leaves after this long without a request
START_TIMEOUT_S = 120.0  # for the server's own imports, on a loaded machine
DIR_ENV = "SENTIMENT_FORK_SERVER_DIR"  # where the sockets live (default: a per-user folder under /tmp)
# What loading a model imports (ray_jobs.onnx_runtime.load_predictor): measured, these are ~3.3 s of a
# model process's start. DistilBERT is the default backbone, BERT the offline quickstart's (MiniLM).
PRELOAD = (
    "numpy",
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.distilbert.modeling_distilbert",
    "transformers.models.bert.modeling_bert",
    "tokenizers",
    "safetensors.torch",
    "pydantic",
    "yaml",
)
_HEADER = struct.Struct("!I")


class ForkServerError(RuntimeError):
    """The fork server cannot start this process: start it the plain way."""


class NoForkServer(ForkServerError):
    """No server is running, and the caller asked not to start one."""


class ForkedProcess:
    """A forked model process, driven as a `subprocess.Popen` is (poll, wait, kill), through a pidfd."""

    returncode: int | None = None  # the server reaps it: the code is not ours to read

    def __init__(self, pid: int, pidfd: int):
        self.pid = pid
        self._pidfd = pidfd
        self._exited = False

    def poll(self) -> int | None:
        """None while it runs; -1 once it has exited (the code went to the server)."""
        if not self._exited and select.select([self._pidfd], [], [], 0)[0]:
            self._exited = True
        return -1 if self._exited else None

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited and not select.select([self._pidfd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(f"model process {self.pid}", timeout or 0)
        self._exited = True
        return -1

    def kill(self) -> None:
        if not self._exited:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._pidfd)


# ---------------------------------------------------------------------- the client (a replica)
def socket_dir() -> Path:
    """The folder of the sockets, created 0700; one that others could enter is refused."""
    folder = Path(os.environ.get(DIR_ENV) or Path(tempfile.gettempdir()) / f"sentiment-fork-server-{os.getuid()}")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.stat()
    except OSError as err:
        raise ForkServerError(f"cannot use {folder}: {err}") from err
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ForkServerError(f"{folder} is not this user's alone (mode {st.st_mode & 0o777:o}): not used")
    return folder


@functools.cache  # fixed for a process's life: not worked out again at every start
def server_key() -> str:
    """Which server fits this process: its interpreter, the preloaded packages' locations, this file."""
    import importlib.util

    h = hashlib.sha256(sys.executable.encode())
    for name in ("torch", "transformers"):
        spec = importlib.util.find_spec(name)
        h.update(str(spec.origin if spec else None).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def start_child(fds: list[int], title: str, argv: list[str], start_server: bool = True) -> ForkedProcess:
    """Fork a model process: `argv` is what `python -m` would get (module first), `fds` the descriptors
    it needs (an argument "{fd0}" becomes the child's number of fds[0], and so on), `title` its command
    line in `ps`. It inherits this process's stdout and stderr. Raises ForkServerError where the server
    cannot do it. `start_server=False`: only a server that runs already (NoForkServer where none does),
    for a command that must not leave a server behind it."""
    if not hasattr(os, "pidfd_open"):
        raise ForkServerError("no pidfd on this system")
    folder = socket_dir()
    path = folder / f"{server_key()}.sock"
    if len(str(path)) > 100:
        raise ForkServerError(f"socket path too long for AF_UNIX: {path}")
    request = {
        "argv": argv,
        "title": title,
        "env": dict(os.environ),
        "path": [p for p in sys.path if p],
        "cwd": os.getcwd(),
    }
    try:
        conn = _connect(path)
    except OSError as err:
        if not start_server:
            raise NoForkServer(f"no fork server at {path}: {err}") from err
        conn = _start_server(folder, path)
    with conn:
        try:
            body = json.dumps(request).encode()
            socket.send_fds(conn, [_HEADER.pack(len(body)) + body], [*fds, 1, 2])
            conn.settimeout(60)
            msg, got, _, _ = socket.recv_fds(conn, 1024, 1)
        except OSError as err:
            raise ForkServerError(f"the fork server at {path} failed: {err}") from err
    if not got:
        raise ForkServerError(f"the fork server at {path} refused: {msg.decode(errors='replace')[:500]}")
    return ForkedProcess(json.loads(msg)["pid"], got[0])


def _connect(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        raise
    return conn


def _start_server(folder: Path, path: Path) -> socket.socket:
    """Start the server (one, however many replicas ask at once) and connect to it."""
    with open(folder / f"{path.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        with contextlib.suppress(OSError):
            return _connect(path)  # another replica started it meanwhile
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead server's socket
        # Ray sets SPT_NOENV (setproctitle must not use the environment's room in its workers): without
        # that room a child's title holds ~110 characters and a long model folder was cut from it.
        env = {k: v for k, v in os.environ.items() if k != "SPT_NOENV"}
        with open(folder / f"{path.stem}.log", "ab") as log_file:
            starter = subprocess.Popen(
                [sys.executable, "-I", __file__, str(path)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                start_new_session=True,
                cwd="/",
            )
        with starter:  # it forks the server, says its pid and leaves (see `main`)
            line = starter.stdout.readline() if starter.stdout else b""
            starter.wait()
        try:
            pidfd = os.pidfd_open(int(line))
        except (ValueError, OSError) as err:
            raise ForkServerError(f"the fork server did not start (see {folder}): {err}") from err
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    return _connect(path)
                if select.select([pidfd], [], [], 0.05)[0]:
                    raise ForkServerError(f"the fork server exited before it listened (see {folder})")
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            raise ForkServerError(f"the fork server did not listen within {START_TIMEOUT_S:.0f}s")
        finally:
            os.close(pidfd)


# ---------------------------------------------------------------------- the server
def serve(path: str) -> int:
    """Preload, listen on `path`, fork a child per request; leave after IDLE_S without one."""
    with contextlib.suppress(ImportError):
        import setproctitle

        # Once, before the preload: the room of argv and of the environment block is then the
        # children's titles' (their model folders can be long).
        setproctitle.setproctitle(" ".join(sys.orig_argv))
    for name in PRELOAD:
        with contextlib.suppress(ImportError):  # a missing optional one only makes its children slower
            __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is 0600 from birth, inside a 0700 folder
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(64)
    listener.settimeout(1.0)
    signal.signal(signal.SIGCHLD, lambda *_: _reap())  # a child that left is gone from the process table at once
    inode = os.stat(path).st_ino
    last = time.monotonic()
    while time.monotonic() - last < IDLE_S:
        _reap()
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        last = time.monotonic()
        with conn:
            _answer(conn, listener)
    with contextlib.suppress(OSError):  # leave the path to a newer server that took it over
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    return 0


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _answer(conn: socket.socket, listener: socket.socket) -> None:
    conn.settimeout(30)
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 8)
        (size,) = _HEADER.unpack(data[: _HEADER.size])
        body = data[_HEADER.size :]
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise ConnectionError("the request ended early")
            body += chunk
        request = json.loads(body)
        # SIGCHLD waits until the pidfd is open: a child that dies at once is not reaped (and its pid
        # reused) before then.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            pid = os.fork()
            if pid == 0:
                _become_child(request, fds, [conn.fileno(), listener.fileno()])  # never returns
            pidfd = os.pidfd_open(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        try:
            socket.send_fds(conn, [json.dumps({"pid": pid}).encode()], [pidfd])
        finally:
            os.close(pidfd)
    except Exception as err:  # noqa: BLE001 - one bad request must not take the server down
        with contextlib.suppress(OSError):
            conn.sendall(f"{type(err).__name__}: {err}".encode())
    finally:
        for fd in fds:
            os.close(fd)


def _become_child(request: dict, fds: list[int], server_fds: list[int]) -> None:
    """In the forked child: become the model process the request describes, then exit."""
    code = 1
    try:
        for fd in server_fds:
            os.close(fd)
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        with contextlib.suppress(ImportError):  # imported and set up by the server (see `serve`)
            import setproctitle

            setproctitle.setproctitle(request["title"])
        *passed, stdout, stderr = fds
        for fd, target in ((stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[:] = request["path"]
        os.chdir(request["cwd"])
        module, *args = request["argv"]
        names = {f"{{fd{i}}}": str(fd) for i, fd in enumerate(passed)}
        sys.argv = [module, *(names.get(a, a) for a in args)]
        import runpy

        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child reports on its stderr and leaves
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def main(path: str) -> int:
    """Fork the server and leave: the server is then no process's child but init's, so that neither
    Ray's clean-up of an exiting replica's children (RAY_kill_child_processes_on_worker_exit) nor the
    replica's end takes it, and the model processes of other replicas, with it."""
    pid = os.fork()
    if pid:
        os.write(1, f"{pid}\n".encode())
        return 0
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the starter reads its stdout until the line above: let it go
    os.close(devnull)
    return serve(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

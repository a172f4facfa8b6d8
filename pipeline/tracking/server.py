"""An MLflow tracking server, for stores with concurrent writers (a sweep's jobs side by side).

``tracking=server`` points the pipeline at one (``tracking.uri``, http://127.0.0.1:5000 by default). When that URI
is on this machine's loopback and nobody answers there, the first process that needs it starts ``mlflow server``
with ``tracking.server_store`` as its backend store and ``tracking.server_artifacts`` as its artifact root, in
its own session, so it outlives the stage and serves the dashboard afterwards; the next stages join it.
``make mlflow-server`` (this module's command line) runs one in the foreground instead.
"""
from __future__ import annotations

import argparse
import fcntl
import http.client
import ipaddress
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from pipeline.errors import PipelineError, shown_path

START_TIMEOUT_S = 120.0  # mlflow server creates its tables on first start (seconds on a slow disk)


def server_command(store: str, artifacts: str, host: str = "127.0.0.1", port: int = 5000,
                   workers: int = 1) -> list[str]:
    """``mlflow server`` with a database backend store, serving the artifacts of experiments created without an
    artifact location (conf/tracking/server.yaml gives one: the local store's folder, which its clients write
    directly, so that both stores read every experiment). One worker by default: a SQLite store takes one writer at a time, and
    a single process serialises the jobs' writes instead of failing them with 'database is locked'."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
            "--artifacts-destination", str(Path(artifacts).resolve()), "--serve-artifacts",
            "--host", host, "--port", str(port), "--workers", str(workers)]


def loopback(uri: str) -> Optional[tuple[str, int]]:
    """(host, port) of an http URI on this machine's loopback, else None."""
    parts = urlsplit(uri)
    if parts.scheme != "http" or not parts.hostname:
        return None
    try:
        local = parts.hostname == "localhost" or ipaddress.ip_address(parts.hostname).is_loopback
        port = parts.port or 80
    except ValueError:  # not an IP address; or a port that is not a number (check_reachable names it)
        return None
    return (parts.hostname, port) if local else None


def listening(host: str, port: int) -> bool:
    """Whether something accepts connections there (a server busy with other clients may be slow to answer)."""
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


def answers(uri: str, timeout_s: float = 2.0) -> bool:
    """Whether an HTTP server answers at ``uri`` (asked directly, not through a proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, http.client.HTTPException):
        return False


def ensure_server(uri: str, store: str, artifacts: str) -> Optional[int]:
    """Start ``mlflow server`` at the loopback ``uri`` unless something answers there; return its pid (None
    when one was running already or the URI is not on loopback, where only its owner can start it).

    A lock beside the artifact root makes concurrent callers start one server between them.
    """
    place = loopback(uri)
    if place is None or listening(*place):
        return None
    host, port = place
    home = Path(artifacts).resolve().parent
    home.mkdir(parents=True, exist_ok=True)
    log = home / f"mlflow-server-{port}.log"
    with open(home / f".mlflow-server-{port}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if listening(host, port):  # another process started it while this one waited
            return None
        with open(log, "ab") as out:
            proc = subprocess.Popen(server_command(store, artifacts, host, port), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + START_TIMEOUT_S
        while not answers(uri, timeout_s=1.0):
            if proc.poll() is not None:
                last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
                raise PipelineError(f"mlflow server at {uri} exited at start ({last[0][:300] if last else 'no output'}); "
                                    f"its log: {shown_path(log)}")
            if time.time() > deadline:
                proc.terminate()
                raise PipelineError(f"mlflow server at {uri} did not answer within {START_TIMEOUT_S:g} s; its log: "
                                    f"{shown_path(log)}")
            time.sleep(0.25)
        (home / f"mlflow-server-{port}.pid").write_text(f"{proc.pid}\n")
    print(f"started mlflow server at {uri} (pid {proc.pid}, store {store}, log {shown_path(log)}); it keeps running "
          f"for the dashboard: stop it with 'kill {proc.pid}'", file=sys.stderr, flush=True)
    return proc.pid


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking.server",
                                     description="Run an MLflow tracking server in the foreground (make mlflow-server): "
                                                 "what tracking=server and parallel sweep launchers write to.")
    parser.add_argument("--store", required=True, help="backend store URI, e.g. sqlite:///outputs/mlflow.db or "
                                                       "postgresql://user@host/db")
    parser.add_argument("--artifacts", required=True, help="the artifact root the server serves (a folder)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for other machines, "
                                                            "e.g. SLURM nodes; default %(default)s)")
    parser.add_argument("--port", type=int, default=5000, help="default %(default)s")
    parser.add_argument("--workers", type=int, default=1, help="server processes (keep 1 with a SQLite store; "
                                                               "default %(default)s)")
    args = parser.parse_args(argv)
    command = server_command(args.store, args.artifacts, args.host, args.port, args.workers)
    print(f"mlflow server on http://{args.host}:{args.port} (store {args.store}); "
          f"use it with ARGS='tracking=server' (tracking.uri=http://{args.host}:{args.port})", flush=True)
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())

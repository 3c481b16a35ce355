"""The servers the server benchmarks start: ours and mlx_lm.server, each a subprocess on a free port of
127.0.0.1, stopped by Ctrl-C; one HTTP connection pool for every request."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# mlx_lm.server with the OpenBLAS that our server preloads on Linux (mlx_mistral._blas), as in the other
# benchmarks: without it MLX's Linux CPU wheel multiplies ~40x slower, and the comparison would say nothing.
MLX_LM_SERVER = "import mlx_mistral, sys; from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()"
# One connection pool for every stream, as one app or agent talking to a server has: a new client per
# request would spend tens of ms of the benchmark's own CPU on each (SSL context, connection).
CLIENT = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, kind: str, model: str, extra: list[str], log: Path | None = None):
        """`log`: a file for the server's output (default: none kept)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = {"ours": [sys.executable, "-m", "mlx_mistral.server", "--max-batch", "16"],
               "mlx_lm": [sys.executable, "-c", MLX_LM_SERVER]}[kind]
        err = log.open("ab") if log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(cmd + ["--model", model, "--port", str(self.port), *extra], cwd=ROOT,
                                         env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"),
                                         stdout=subprocess.DEVNULL, stderr=err)
        finally:
            if log:
                err.close()  # the server holds its own copy
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{kind} server did not start")

    def peak_rss(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024

    def stop(self) -> None:
        """Ctrl-C (both servers stop on it), then kill if it lingers."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            print(f"the server on port {self.port} lingered after Ctrl-C: killed", file=sys.stderr)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

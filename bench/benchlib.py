"""Helpers shared by the benchmark scripts in this folder (not a package: the
scripts import it from their own directory)."""

from __future__ import annotations

import signal
import socket
import subprocess

HOST = "127.0.0.1"


class BenchmarkError(Exception):
    """A benchmark cannot go on; the message says why."""


def free_port() -> int:
    """Return a loopback port that is free for both TCP and UDP."""
    for _attempt in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((HOST, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((HOST, port))
                except OSError:
                    continue
            return port
    raise BenchmarkError("no loopback port was free for both TCP and UDP after 50 attempts")


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a child with SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

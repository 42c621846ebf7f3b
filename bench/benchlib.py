"""Helpers shared by the benchmark scripts in this folder (not a package: the
scripts import it from their own directory)."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

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


Row = tuple[str, str, str]  # metric, value, note
Result = TypeVar("Result")


def describe_machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, {platform.system()}"


def run_benchmark(
    program: str,
    title: str,
    measure: Callable[[Path, contextlib.ExitStack], Result],
    report: Callable[[Result], None],
) -> int:
    """Print the header, run ``measure`` in a temporary folder, then ``report``; return the exit code.

    ``measure`` registers on the exit stack how to stop what it starts, so an
    error, Ctrl-C or SIGTERM stops every child before the message is printed.
    """
    # SIGTERM takes the same path as Ctrl-C, so the cleanup below stops every child.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"LogPose {title}, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {describe_machine()}")
    print(f"command: {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}")
    print()
    try:
        with contextlib.ExitStack() as cleanup:
            work_dir = Path(tempfile.mkdtemp(prefix=f"logpose-{program}-"))
            cleanup.callback(shutil.rmtree, work_dir, ignore_errors=True)
            results = measure(work_dir, cleanup)
    except BenchmarkError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{program}: interrupted; every started process was stopped", file=sys.stderr)
        return 130
    report(results)
    return 0


def print_rows(sections: list[tuple[str, list[Row]]]) -> None:
    """Print rows as aligned columns, each section after a rule that carries its heading."""
    rows = [row for _heading, section in sections for row in section]
    width = max(len(name) for name, _value, _note in rows)
    value_width = max(len(value) for _name, value, _note in rows)
    print(f"{'metric':<{width}}  {'value':<{value_width}}  note")
    for heading, section in sections:
        print(f"{'-' * width}  {'-' * value_width}  ----{'  ' + heading if heading else ''}")
        for name, value, note in section:
            print(f"{name:<{width}}  {value:<{value_width}}  {note}".rstrip())

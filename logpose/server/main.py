"""``logpose-server``: parse the command line, load settings, run until a signal.

A first argument that names a subcommand (``check-config``, ``migrate``,
``snapshot``) runs that command instead; see ``logpose.server.commands``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from logpose import __version__
from logpose.config import Settings, load_settings
from logpose.errors import ConfigError
from logpose.logsetup import configure_logging
from logpose.server import commands
from logpose.server.lifecycle import EXIT_CONFIG, StartupError, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logpose-server",
        description="Run the LogPose service discovery server (HTTP API and DNS).",
        epilog="Each option is also an environment variable LOGPOSE_<OPTION> and a key in the TOML file. "
        "Other commands: logpose-server check-config FILE, logpose-server migrate, "
        "logpose-server snapshot save|restore FILE (each with --help).",
    )
    parser.add_argument("--version", action="version", version=f"logpose {__version__}")
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    parser.add_argument("--http-listen", metavar="HOST:PORT", help="HTTP API address (default 127.0.0.1:8470)")
    parser.add_argument(
        "--dns-listen", metavar="HOST:PORT", action="append",
        help="DNS address, UDP and TCP; repeat for several (default 127.0.0.1:8653)",
    )
    parser.add_argument("--data-dir", metavar="DIR", help="directory for the database and keys (default ./data)")
    parser.add_argument("--database-url", metavar="URL", help="database URL (default: SQLite file in the data directory)")
    parser.add_argument("--domain", help="DNS zone served (default logpose.internal)")
    parser.add_argument("--probe-interval", metavar="SECONDS", help="seconds between health probes (default 10)")
    parser.add_argument("--probe-timeout", metavar="SECONDS", help="seconds before a probe fails (default 2)")
    parser.add_argument("--probe-concurrency", metavar="N", help="probes in flight at most (default 64)")
    parser.add_argument("--health-rise", metavar="N", help="consecutive successes to turn Healthy (default 1)")
    parser.add_argument(
        "--health-fall", metavar="N", help="consecutive failures to turn a Healthy instance Unhealthy (default 2)"
    )
    parser.add_argument(
        "--deregister-after", metavar="SECONDS", help="remove instances Unhealthy this long; 0 never (default 0)"
    )
    parser.add_argument(
        "--mass-failure-guard", metavar="BOOL",
        help="keep last known health when many instances fail at once: true or false (default true)",
    )
    parser.add_argument(
        "--mass-failure-share", metavar="FRACTION",
        help="share of probed instances failing within one interval that engages the guard (default 0.5)",
    )
    parser.add_argument("--dns-ttl", metavar="SECONDS", help="TTL of DNS answers in seconds (default 5)")
    parser.add_argument(
        "--dns-max-udp-payload", metavar="BYTES",
        help="EDNS0 UDP payload size advertised, and largest UDP answer, 512 to 65535 (default 1232)",
    )
    parser.add_argument(
        "--dns-answer-limit", metavar="N", help="A/AAAA records per service name in one answer; 0 no limit (default 0)"
    )
    parser.add_argument(
        "--dns-reverse-zones", metavar="CIDR", action="append",
        help="networks whose addresses get PTR answers, comma-separated or repeated (default none)",
    )
    parser.add_argument(
        "--dns-allow", metavar="CIDR", action="append",
        help="networks that may query DNS, others get REFUSED; comma-separated or repeated (default everyone)",
    )
    parser.add_argument(
        "--dns-rate-limit", metavar="N", help="UDP responses per second to one source address; 0 no limit (default 0)"
    )
    parser.add_argument(
        "--dns-workers", metavar="N",
        help="processes answering DNS, this one included, 1 to 64; above 1 they share the ports "
        "with SO_REUSEPORT (default 1)",
    )
    parser.add_argument(
        "--recursors", metavar="HOST:PORT", action="append",
        help="resolvers asked in order for names outside the zone; comma-separated or repeated (default none: REFUSED)",
    )
    parser.add_argument("--recursor-timeout", metavar="SECONDS", help="seconds to wait for each recursor (default 2)")
    parser.add_argument("--token-lifetime", metavar="SECONDS", help="lifetime of issued tokens (default 3600)")
    parser.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain; with --tls-key the API serves HTTPS")
    parser.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert, not encrypted")
    parser.add_argument(
        "--tls-client-ca", metavar="FILE",
        help="PEM CA certificates; a client certificate they signed may replace the secret in token requests",
    )
    parser.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser.add_argument(
        "--log-levels", metavar="LOGGER=LEVEL", action="append",
        help="levels of single loggers over --log-level, comma-separated or repeated, "
        "like logpose.access=WARNING,logpose.dns=DEBUG (default none)",
    )
    parser.add_argument(
        "--log-format", metavar="FORMAT", help="text, or json for one JSON object per line (default text)"
    )
    parser.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=None,
        help="log one line per HTTP request to logpose.access (default on)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in commands.SUBCOMMANDS:
        # Only warnings and errors: a command's result is its own output.
        configure_logging(Settings(log_level="WARNING"))
        sys.exit(commands.run(argv))

    arguments = vars(build_parser().parse_args(argv))
    config_file = arguments.pop("config")
    configure_logging()
    try:
        settings = load_settings(arguments, config_file=config_file)
    except ConfigError as exc:
        print(f"logpose-server: invalid configuration: {exc.detail}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    configure_logging(settings)
    # The data directory contains the database, with every client's secret hash,
    # and the token key: files the server makes are for its own user only.
    os.umask(0o077)

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional on other platforms
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(settings, lambda: load_settings(arguments, config_file=config_file)))
    except StartupError as exc:
        print(f"logpose-server: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

"""The ``uvworker`` command: argparse generated from the settings table.

Precedence: command line, then ``UVWORKER_<NAME>`` environment variables, then those in the
``--env-file``, then defaults. A bad option or value is one line on stderr and exit code 2 (not
argparse's usage dump).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from uvworker import __version__
from uvworker.errors import EXIT_USAGE, ConfigError
from uvworker.settings import BY_NAME, SETTINGS, Setting, from_environ, show


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"uvworker: error: {message.removeprefix('argument ')}\n")


def _argument_type(setting: Setting) -> Any:
    def convert(value: str) -> Any:
        try:
            return setting.check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="uvworker",
        description="Serve an ASGI application. Every option can also be set with the "
        "environment variable shown; the command line wins.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"uvworker {__version__} with {platform.python_implementation()} "
        f"{platform.python_version()} on {platform.system()}",
    )
    for s in SETTINGS:
        default = f"default: {show(s.default)}; " if show(s.default) else ""
        help = f"{s.help} ({default}env {s.env})".replace("%", "%%")
        if s.kind == "arg":
            parser.add_argument(  # default None: argparse would run the type on a string default
                s.name, nargs="?", default=None, type=_argument_type(s), metavar=s.metavar, help=help
            )
        elif s.kind == "flag":
            parser.add_argument(*s.flags, dest=s.name, action=argparse.BooleanOptionalAction, help=help)
        else:
            action = "append" if s.kind == "list" else "store"
            parser.add_argument(
                *s.flags, dest=s.name, action=action, type=_argument_type(s), metavar=s.metavar, help=help
            )
    return parser


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from the command line over those from ``environ`` over those in the env file;
    exits 2 on a mistake."""
    parser = build_parser()
    given = {name: value for name, value in vars(parser.parse_args(argv)).items() if value is not None}
    try:
        env_file = given.get("env_file") or environ.get(BY_NAME["env_file"].env, "").strip()
        if env_file:
            from uvworker.envfile import read_env_file

            environ = {**read_env_file(env_file), **environ}
        settings = from_environ(environ)
    except (ValueError, ConfigError) as err:
        parser.error(str(err))
    if env_file:
        settings["env_file"] = env_file  # the file read here, not one it names itself
    settings.update(given)
    if settings.get("app") is None:
        parser.error("no application given: name it as module:attribute, e.g. uvworker main:app")
    return settings


def main(argv: Sequence[str] | None = None) -> NoReturn:
    from uvworker.config import Config
    from uvworker.main import launch

    config = Config(**parse(argv, os.environ))
    sys.exit(launch(config))

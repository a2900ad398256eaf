"""``--env-file``: a dotenv file, read with python-dotenv as uvicorn reads it.

The file serves twice. The command line reads it (``read_env_file``) under the real
environment, so ``UVWORKER_*`` lines in it are settings; ``Config.load()`` loads it into
``os.environ`` (``load_env_file``) before importing the application, without overriding
variables that are already set. In supervisor mode that happens in each worker, so the app
sees the variables whichever process imports it.
"""

from __future__ import annotations

import os
from typing import Any

from uvworker.errors import ConfigError


def _dotenv() -> Any:
    try:
        import dotenv
    except ImportError:
        raise ConfigError(
            "--env-file needs the python-dotenv package: pip install 'uvworker[standard]'"
        ) from None
    return dotenv


def _check(path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"the --env-file {path!r} does not exist")


def read_env_file(path: str) -> dict[str, str]:
    """The variables the file sets (a name without ``=value`` sets nothing)."""
    _check(path)
    try:
        values = _dotenv().dotenv_values(path, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the --env-file {path!r}: {err}") from None
    return {name: value for name, value in values.items() if value is not None}


def load_env_file(path: str) -> None:
    """Put the file's variables into ``os.environ``; those already set keep their values."""
    _check(path)
    try:
        _dotenv().load_dotenv(path, override=False, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the --env-file {path!r}: {err}") from None

"""Import the application named on the command line ("module:attribute", --app-dir, --factory)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from uvworker.errors import AppImportError


def import_app(spec: str, app_dir: str | None = None) -> Any:
    """The object named by ``spec``; ``app_dir`` goes first on sys.path."""
    module_name, _, attribute = spec.partition(":")
    if app_dir is not None:
        path = os.path.abspath(app_dir)
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the app's own import-time errors included: report them all alike
        raise AppImportError(f"cannot import module {module_name!r}: {type(err).__name__}: {err}") from err
    app: Any = module
    for name in attribute.split("."):
        try:
            app = getattr(app, name)
        except AttributeError:
            raise AppImportError(f"module {module_name!r} has no attribute {attribute!r}") from None
    return app


def call_factory(factory: Any, name: str) -> Any:
    """The application returned by ``factory()`` (--factory)."""
    if not callable(factory):
        raise AppImportError(f"the application factory {name} is not callable")
    try:
        return factory()
    except Exception as err:
        raise AppImportError(f"the application factory {name} failed: {type(err).__name__}: {err}") from err

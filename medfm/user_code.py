"""User functions named on the command line or in a config by their dotted path (`package.module:function`)."""

from __future__ import annotations

import pkgutil
from collections.abc import Callable


def import_function(path: str, role: str, signature: str) -> Callable:
    """The callable at `package.module:function` (or `package.module.function`); errors name `role` (e.g. "--scorer") and the
    expected `signature`."""
    module_name, _, function_name = path.rpartition(":") if ":" in path else path.rpartition(".")
    try:
        function = pkgutil.resolve_name(path)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{role} {path}: cannot import {function_name!r} from module {module_name!r} ({err}); the module must be "
                         "importable (installed or on PYTHONPATH) and define the function") from err
    if not callable(function):
        raise ValueError(f"{role} {path}: not callable; it must be a function {signature}")
    return function

"""The MLX backend.

mlx-lm's package `__init__` imports its converter and tokenizer helpers, and with them transformers
and torch: seconds and hundreds of MB that an MLX peer, which needs only `mlx_lm.models` (blocks,
caches) and `mlx_lm.sample_utils`, never uses. So the first import of this package registers mlx_lm
as a package whose `__init__` runs only when something asks the package itself for a name
(`mlx_lm.load`, `mlx_lm.__version__`); its submodules import as usual.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from importlib.abc import Loader
from importlib.machinery import ModuleSpec
from typing import Any


class _DeferredPackage(types.ModuleType):
    """A package whose submodules import at once and whose own `__init__` runs on first attribute use."""

    def __init__(self, spec: ModuleSpec, loader: Loader) -> None:
        super().__init__(spec.name)
        self.__spec__, self.__loader__, self.__file__ = spec, loader, spec.origin
        self.__path__ = list(spec.submodule_search_locations or [])
        self.__package__ = spec.name
        self._deferred = (loader, threading.RLock(), [False])

    def __getattr__(self, name: str) -> Any:  # only for names not set yet
        loader, lock, ran = self._deferred
        with lock:  # another thread asking meanwhile waits for the whole __init__ (this one may re-enter)
            if not ran[0]:
                ran[0] = True
                loader.exec_module(self)
                self.__class__ = types.ModuleType  # type: ignore[assignment]
        return types.ModuleType.__getattribute__(self, name)


def defer_init(name: str) -> None:
    """Register package `name` (not imported yet) so that its `__init__` runs only on first use of one
    of its own names; importing its submodules does not run it. No-op if imported or not installed."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return  # not installed: importing the backend says which extra to install
    sys.modules[name] = _DeferredPackage(spec, spec.loader)


defer_init("mlx_lm")

"""Package attributes that import their module on first use (PEP 562).

A data worker that imports `tinysam.transforms` or `tinysam.everything.config` should not pay for
torch and the models; packages export their heavy names through this instead of importing them.
`tinysam.modeling` has its own copy: the models import nothing from the rest of the library.
"""

import importlib
from typing import Any, Callable, Dict


def lazy_exports(package: str, exports: Dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` resolving each name of `exports` ({name: submodule})."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__

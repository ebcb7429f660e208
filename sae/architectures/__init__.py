"""SAE architectures: one module per architecture, each registering an Architecture subclass.

Importing this package imports every module in this folder, so a new architecture is one new file
(plus its tests). `ARCHITECTURES` maps SAEConfig.activation to the class.
"""

import importlib
import pkgutil

from .base import Architecture, LossInputs
from .registry import ARCHITECTURES, get_architecture, register

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["ARCHITECTURES", "Architecture", "LossInputs", "get_architecture", "register"]

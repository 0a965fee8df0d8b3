"""timm's augmentation modules, for the PIL + DataLoader baseline and for the tests that hold
maeflow's augmentation to timm's semantics.

timm's package imports torchvision, which has no build that loads beside a CPU-only torch wheel; its
`timm.data.auto_augment`, `random_erasing` and `mixup` need only PIL, numpy and torch. Where `import
timm` fails, those files are loaded on their own (the same code, not a copy). timm is installed
without its dependencies for that reason (`pip install --no-deps timm`, as run.sh does).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def timm_data_module(name: str) -> ModuleType:
    """`timm.data.<name>` (auto_augment, random_erasing or mixup)."""
    try:
        return importlib.import_module(f"timm.data.{name}")
    except ImportError as err:
        spec = importlib.util.find_spec("timm")  # finds the package without running its __init__
        if spec is None or spec.origin is None:
            raise ImportError("the PIL baseline's fine-tuning augmentations come from timm: "
                              "pip install --no-deps 'timm>=1.0'") from err
    standalone = f"maeflow_timm_{name}"
    if standalone not in sys.modules:
        path = Path(spec.origin).parent / "data" / f"{name}.py"
        module_spec = importlib.util.spec_from_file_location(standalone, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        sys.modules[standalone] = module
    return sys.modules[standalone]

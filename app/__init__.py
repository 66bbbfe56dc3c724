"""scalestack: train GPTs with Ray Train + DeepSpeed on spot clusters, fit scaling laws, serve behind a router.

The SDK functions are re-exported here so a notebook can `import app; app.prepare_data(...)`. Importing starts
no Ray and loads no torch. `Client` submits CLI commands as Ray jobs (app/client.py imports Ray only when a
Client is made).
"""

from app.client import Client, Job
from app.sdk import (
    ModelInfo,
    chaos,
    deploy,
    distill,
    evaluate,
    fit,
    fit_report,
    info,
    load_config,
    load_fit,
    models,
    plan,
    prepare_data,
    quantize,
    sweep,
    train,
)

import sys as _sys
import types as _types


class _Package(_types.ModuleType):
    """This package, keeping its SDK functions when a submodule of the same name is imported: `app.distill`,
    `app.quantize` and `app.evaluate` are both functions here and modules (app/distill.py, ...), and Python's
    import system sets the package attribute to the submodule the first time one is imported — which used to turn
    `app.distill(...)` into "'module' object is not callable" after a first distillation in the same process."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, _types.ModuleType) and callable(self.__dict__.get(name)):
            return  # the submodule stays reachable as sys.modules["app.NAME"] and through `from app.NAME import`
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

__all__ = ["Client", "Job", "ModelInfo", "chaos", "deploy", "distill", "evaluate", "fit", "fit_report", "info",
           "load_config", "load_fit", "models", "plan", "prepare_data", "quantize", "sweep", "train"]

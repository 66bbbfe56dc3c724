"""scalestack: train GPTs with Ray Train + DeepSpeed on spot clusters, fit scaling laws, serve behind a router.

The SDK functions are re-exported here so a notebook can `import app; app.prepare_data(...)`. Importing starts
no Ray and loads no torch.
"""

from app.sdk import (
    ModelInfo,
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

__all__ = ["ModelInfo", "deploy", "distill", "evaluate", "fit", "fit_report", "info", "load_config", "load_fit",
           "models", "plan", "prepare_data", "quantize", "sweep", "train"]

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

__all__ = ["Client", "Job", "ModelInfo", "chaos", "deploy", "distill", "evaluate", "fit", "fit_report", "info",
           "load_config", "load_fit", "models", "plan", "prepare_data", "quantize", "sweep", "train"]

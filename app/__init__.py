"""scalestack: train GPTs with Ray Train + DeepSpeed on spot clusters, fit scaling laws, serve behind a router.

The SDK functions are re-exported here so a notebook can `import app; app.prepare_data(...)`. Importing starts
no Ray and loads no torch.
"""

from app.sdk import ModelInfo, distill, fit, fit_report, info, load_config, load_fit, plan, prepare_data, sweep, train

__all__ = ["ModelInfo", "distill", "fit", "fit_report", "info", "load_config", "load_fit", "plan", "prepare_data", "sweep",
           "train"]

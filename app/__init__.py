"""scalestack: train GPTs with Ray Train + DeepSpeed on spot clusters, fit scaling laws, serve behind a router.

The SDK functions are re-exported here so a notebook can `import app; app.prepare_data(...)`. Importing starts
no Ray and loads no torch.
"""

from app.sdk import ModelInfo, info, load_config, prepare_data, train

__all__ = ["ModelInfo", "info", "load_config", "prepare_data", "train"]

"""Ray jobs: each module has run(...) -> result and main(); `python -m pipelines.<name>` works too."""

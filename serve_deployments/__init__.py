"""Ray Serve deployments: LMServer (one per registry artifact) behind the Router ingress.

Importing this package starts nothing; `serve_deployments.app:build_app` is the import path for `serve run`.
"""

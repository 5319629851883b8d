"""Ray Serve application: encoder and decoder deployments passing latent plans, behind a FastAPI ingress.

    serve.app:build_app     the application builder (`serve run serve/config.yaml`)
    serve.deployments       PlanEncoder (image -> plan bytes), PlanDecoder (plan bytes -> caption)
    serve.ingress           the HTTP routes (/v1/caption, /v1/encode, /v1/decode, /v1/model, /healthz)
    serve.demo              serve the model `python -m jobs.demo` trained and caption a held-out image

A model source (path, models:/ or runs:/ URI) becomes a checkpoint through `jobs.checkpoints`, the rule
jobs.evaluate uses too. Importing this package is cheap: submodules import Ray and torch only when used.
"""

"""Ray Serve application: a FastAPI ingress that encodes images and a decoder deployment, passing latent plans.

    serve.app:build_app     the application builder (`serve run serve/config.yaml`)
    serve.deployments       PlanEncoder (image -> plan bytes, held by the ingress), PlanDecoder (plan bytes -> caption)
    serve.ingress           Ingress (HTTP + encoder): /v1/caption, /v1/encode, /v1/decode, /v1/model, /healthz
    serve.stages            a request's encode and decoder call: timeouts, the replica-loss retry, error statuses
    serve.demo              serve the model `python -m jobs.demo` trained and caption a held-out image

A model source (path, models:/ or runs:/ URI) becomes a checkpoint through `jobs.checkpoints`, the rule
jobs.evaluate uses too. Importing this package is cheap: submodules import Ray and torch only when used.
"""

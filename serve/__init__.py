"""Ray Serve application: encoder and decoder deployments passing latent plans, behind a FastAPI ingress.

    serve.app:build_app     the application builder (`serve run serve/config.yaml`)
    serve.deployments       PlanEncoder (image -> plan bytes), PlanDecoder (plan bytes -> caption)
    serve.ingress           the HTTP routes (/v1/caption, /v1/encode, /v1/decode, /v1/model, /healthz)
    serve.loading           model source -> local checkpoint (path, models:/ or runs:/ URI)
    serve.demo              serve the model `python -m jobs.demo` trained and caption a held-out image

Importing this package is cheap: submodules import Ray and torch only when used.
"""

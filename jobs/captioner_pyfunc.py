"""The registered MLflow model: a pyfunc that captions image bytes with a safetensors checkpoint.

MLflow stores this file itself as the model's code ("models from code") together with a copy of
the `model/` package (`code_paths`) and the checkpoint as an artifact, so
`mlflow.pyfunc.load_model("models:/NAME@ALIAS")` works in any environment that has the pip
requirements, with no checkout of this repository and nothing of torch pickled. Only `model.*`
may be imported here: the jobs/ package does not travel with the model.

`jobs.tracking.log_and_register` writes and registers it.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class CaptionerModel(PythonModel):
    """`predict` takes a list of encoded images (bytes), or a one-column DataFrame of them, and
    returns one greedy caption per image."""

    def load_context(self, context: Any) -> None:
        from model.checkpoint import load_model
        from model.tokenizer import ByteTokenizer
        from model.transform import ImageTransform

        loaded = load_model(context.artifacts["checkpoint"])
        self._model = loaded.model.eval()
        self._tokenizer = ByteTokenizer(loaded.config.model.max_seq_length)
        self._transform = ImageTransform(loaded.config.model.image_size)

    def predict(self, context: Any, model_input: list[bytes], params: dict[str, Any] | None = None) -> list[str]:
        import torch

        from model.generation import caption_images

        if hasattr(model_input, "iloc"):  # a DataFrame with one column of image bytes
            model_input = list(model_input.iloc[:, 0])
        images = torch.stack([self._transform(data) for data in model_input])  # (B, 3, S, S)
        with torch.no_grad():
            return caption_images(self._model, images, self._tokenizer)


mlflow.models.set_model(CaptionerModel())

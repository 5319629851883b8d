"""The plain reader (pyarrow only, no Ray): a whole prepared split in memory, for evaluation, the training
loop's validation pass and serving demos. The folder may be local or a URI (jobs/storage.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from jobs.shards import heldout_mask, holdout, locate, shard_locations
from jobs.storage import Where
from model.config import Config
from model.transform import open_image, resize_center_crop, to_tensor

if TYPE_CHECKING:
    import torch
# torch only inside load_split: jobs.dataset imports this module, and Ray processes that only unpickle the
# pipeline (its epoch clock, Ray Data's split coordinator) never need it (see model/tokenizer.py).


@dataclass
class EvalSet:
    """A whole split in memory: images (N, 3, S, S) with all their captions and category ids."""

    image_ids: list[int]
    images: torch.Tensor
    captions: list[list[str]]
    category_ids: list[list[int]]
    file_names: list[str]

    def __len__(self) -> int:
        return len(self.image_ids)


def load_split(
    data_dir: Where, split: str, image_size: int, *, limit: int = 0, heldout: tuple[float, bool] | None = None
) -> EvalSet:
    """Read ROOT/<split> with pyarrow and decode every image to (3, S, S); `limit` > 0 keeps the first N by id.

    `heldout=(fraction, keep_heldout)` applies the hold-out rule of `heldout_mask`.
    """
    import torch

    out = EvalSet([], torch.zeros(0, 3, image_size, image_size), [], [], [])
    images: list[torch.Tensor] = []
    for shard in shard_locations(locate(data_dir) / split):
        table = pq.read_table(shard.path, filesystem=shard.fs)
        ids = table["image_id"].to_numpy()
        keep = np.ones(len(ids), dtype=bool)
        if heldout is not None and heldout[0] > 0:
            keep = heldout_mask(ids, heldout[0]) == heldout[1]
        cols = {name: table[name].to_pylist() for name in ("file_name", "captions", "category_ids", "image")}
        for i in np.flatnonzero(keep):
            if limit and len(out.image_ids) >= limit:
                break
            out.image_ids.append(int(ids[i]))
            out.file_names.append(cols["file_name"][i])
            out.captions.append(list(cols["captions"][i]))
            out.category_ids.append(list(cols["category_ids"][i]))
            images.append(
                to_tensor(resize_center_crop(open_image(cols["image"][i], draft_size=image_size), image_size))
            )
    if images:
        out.images = torch.stack(images)  # (N, 3, S, S)
    return out


def load_eval_split(data_dir: Where, cfg: Config, *, limit: int = 0) -> EvalSet | None:
    """The validation set of a config (val split, or the held-out part of train) at cfg.model.image_size."""
    root = locate(data_dir)
    _train, val, fraction = holdout(root, cfg)
    if val is None:
        return None
    return load_split(root, val.name, cfg.model.image_size, limit=limit, heldout=(fraction, True) if fraction else None)

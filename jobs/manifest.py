"""The prepared-split layout: what `jobs.prepare` writes and `jobs.dataset` reads, defined once.

    ROOT/<split>/part-00000.parquet ...   rows with SCHEMA (one per image, sorted by image_id)
    ROOT/<split>/manifest.json            MANIFEST, written last; its "schema_version" is SCHEMA_VERSION

A reader refuses a split whose manifest carries another schema version, so a change to SCHEMA
bumps SCHEMA_VERSION here and both sides see it.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("captions", pa.list_(pa.string())),
        ("category_ids", pa.list_(pa.int64())),
    ],
    metadata={"vljepa.schema_version": str(SCHEMA_VERSION)},
)
# The image bytes are already compressed; zstd only pays off on the text and id columns.
COMPRESSION = {"image_id": "zstd", "file_name": "zstd", "image": "none", "width": "zstd", "height": "zstd"}
COMPRESSION |= {"captions": "zstd", "category_ids": "zstd"}

"""Byte-level tokenizer: 4 special ids, then one id per byte value.

    PAD=0  BOS=1  EOS=2  UNK=3  byte b -> b + 4   (VOCAB_SIZE = 260)

Any string encodes (UTF-8 bytes), and any id sequence decodes: a model can emit
byte sequences that are not valid UTF-8, so decoding replaces them with U+FFFD
instead of raising. Training and serving share this one class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

# torch is imported where a tensor is made, not here: jobs.batches (the Ray Data transform) imports this module,
# and so do Ray processes that only unpickle the pipeline (Ray Data's split coordinator, Ray Train's dataset
# manager, jobs.dataset's epoch clock); importing torch cost each of them ~1.6 s of CPU in every fit.

PAD, BOS, EOS, UNK = 0, 1, 2, 3
NUM_SPECIALS = 4
VOCAB_SIZE = NUM_SPECIALS + 256


class ByteTokenizer:
    """UTF-8 bytes <-> ids, with BOS/EOS framing and truncation to `max_len` tokens."""

    def __init__(self, max_len: int) -> None:
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold BOS and EOS, got {max_len}")
        self.max_len = max_len
        self.vocab_size = VOCAB_SIZE
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = PAD, BOS, EOS, UNK

    def encode(self, text: str) -> list[int]:
        """`[BOS, *bytes+4, EOS]`; too long -> the bytes are cut so EOS still ends the sequence."""
        # errors="surrogatepass" lets lone surrogates (from odd JSON) through instead of raising.
        body = [b + NUM_SPECIALS for b in text.encode("utf-8", errors="surrogatepass")]
        body = body[: self.max_len - 2]
        return [BOS, *body, EOS]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Bytes up to the first EOS; specials (PAD, BOS, UNK) are skipped; never raises."""
        if hasattr(ids, "tolist"):  # a tensor or an array
            ids = ids.reshape(-1).tolist()
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if NUM_SPECIALS <= i < VOCAB_SIZE:
                out.append(i - NUM_SPECIALS)
            # PAD / BOS / UNK and out-of-range ids carry no byte: skip them.
        return out.decode("utf-8", errors="replace")

    def batch(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Encode and right-pad to the longest: ids (B, T) long, mask (B, T) bool (True = real token)."""
        import torch

        encoded = [self.encode(t) for t in texts]
        width = max((len(e) for e in encoded), default=0)
        ids = torch.full((len(encoded), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.bool)
        for row, seq in enumerate(encoded):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = True
        return ids, mask

    def decode_batch(self, ids: Tensor) -> list[str]:
        """Decode each row of (B, T) ids."""
        return [self.decode(row) for row in ids.tolist()]

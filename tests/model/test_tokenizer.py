"""The byte tokenizer: ids, round trips, truncation, batching, and decoding of arbitrary ids."""

from __future__ import annotations

import torch

from model.tokenizer import BOS, EOS, PAD, UNK, VOCAB_SIZE, ByteTokenizer


def test_special_ids_and_byte_offset():
    tok = ByteTokenizer(max_len=16)
    assert (PAD, BOS, EOS, UNK, VOCAB_SIZE) == (0, 1, 2, 3, 260)
    assert tok.encode("") == [BOS, EOS]
    assert tok.encode("a") == [BOS, ord("a") + 4, EOS]
    assert tok.encode("\x00\xff")[1:-1] == [0 + 4, 0xC3 + 4, 0xBF + 4]  # U+00FF is two UTF-8 bytes


def test_round_trip_ascii_and_non_ascii():
    tok = ByteTokenizer(max_len=128)
    for text in ["a red square on a table", "café crème", "日本語のキャプション", "emoji 🐈‍⬛ ok", "tab\tnewline\n"]:
        ids = tok.encode(text)
        assert ids[0] == BOS and ids[-1] == EOS
        assert all(4 <= i < VOCAB_SIZE for i in ids[1:-1])
        assert tok.decode(ids) == text
        assert tok.decode(torch.tensor(ids)) == text


def test_truncation_keeps_eos_and_counts_bytes():
    tok = ByteTokenizer(max_len=8)
    ids = tok.encode("abcdefghijklmnop")
    assert len(ids) == 8
    assert ids[0] == BOS and ids[-1] == EOS
    assert tok.decode(ids) == "abcdef"  # 8 - BOS - EOS = 6 bytes
    assert len(tok.encode("abcdef")) == 8  # exactly fits: nothing cut
    # Cutting inside a multi-byte character still decodes (to a replacement char), never raises.
    assert tok.decode(ByteTokenizer(max_len=4).encode("é€")) == "é"
    assert tok.decode(ByteTokenizer(max_len=5).encode("é€")) == "é\ufffd"


def test_batch_pads_to_longest_with_mask():
    tok = ByteTokenizer(max_len=32)
    ids, mask = tok.batch(["ab", "", "abcde"])
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == mask.shape == (3, 7)  # longest: BOS + 5 + EOS
    assert mask.sum(dim=1).tolist() == [4, 2, 7]
    assert (ids[~mask] == PAD).all()
    assert ids[0, :4].tolist() == [BOS, ord("a") + 4, ord("b") + 4, EOS]
    assert tok.decode_batch(ids) == ["ab", "", "abcde"]


def test_batch_respects_max_len():
    tok = ByteTokenizer(max_len=6)
    ids, mask = tok.batch(["x" * 100, "y"])
    assert ids.shape == (2, 6)
    assert ids[0, -1].item() == EOS


def test_decode_stops_at_eos_and_skips_specials():
    tok = ByteTokenizer(max_len=32)
    h, i = ord("h") + 4, ord("i") + 4
    assert tok.decode([BOS, h, PAD, UNK, i, EOS, h, h]) == "hi"
    assert tok.decode([h, i]) == "hi"  # no BOS/EOS: still fine
    assert tok.decode([h, 9999, -5, i]) == "hi"  # ids outside the vocabulary carry no byte


def test_decode_invalid_utf8_never_raises():
    tok = ByteTokenizer(max_len=32)
    # A lone continuation byte, a truncated 3-byte sequence, an overlong encoding, and 0xFF.
    bad = [BOS, 0x80 + 4, 0xE2 + 4, 0x82 + 4, 0xC0 + 4, 0xAF + 4, 0xFF + 4, ord("a") + 4, EOS]
    text = tok.decode(bad)
    assert text.endswith("a") and "\ufffd" in text
    # Every possible id, in any order, decodes.
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert isinstance(tok.decode(torch.randint(0, VOCAB_SIZE, (40,), generator=gen)), str)

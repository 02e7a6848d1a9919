"""Offline CLIP tokenizer built from the BPE merges that open_clip ships inside its wheel."""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

from transformers import CLIPTokenizer

CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (the BPE alphabet; no library exposes it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def clip_tokenizer(num_merges: int | None = None, model_max_length: int = 77) -> CLIPTokenizer:
    """The CLIP tokenizer, offline; keep only the first `num_merges` merges for a smaller, consistent vocab."""
    bpe_path = resources.files("open_clip") / CLIP_BPE_FILE
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines if line]
    if num_merges is not None:
        merges = merges[:num_merges]
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)

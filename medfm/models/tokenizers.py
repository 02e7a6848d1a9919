"""Offline tokenizers (CLIP BPE, T5-style Unigram, Gemma-style BPE) built from the CLIP BPE that open_clip ships inside its wheel."""

from __future__ import annotations

import gzip
import math
from functools import lru_cache
from importlib import resources

from transformers import CLIPTokenizer, GemmaTokenizerFast, T5TokenizerFast

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


def _clip_pieces(num_merges: int) -> list[str]:
    """CLIP's BPE pieces in merge (frequency) order, without the end-of-word mark, ASCII only, deduplicated."""
    bpe_path = resources.files("open_clip") / CLIP_BPE_FILE
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : num_merges + 1]
    singles = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces = dict.fromkeys(singles + ["".join(line.split()).removesuffix("</w>") for line in lines if line])
    return [p for p in pieces if p.isascii() and p.isprintable() and p]


@lru_cache
def _sentencepiece_pieces(num_merges: int) -> tuple[str, ...]:
    """SentencePiece-style pieces ("▁" marks a word start) in frequency order, each with its word-start and upper-case forms.

    Derived from CLIP's lower-case BPE so that report words ("effusion", "FINDINGS", "Pleural") split into known pieces.
    """
    pieces: dict[str, None] = {"▁": None}
    for piece in _clip_pieces(num_merges):
        for variant in (piece, "▁" + piece, "▁" + piece.capitalize(), piece.upper(), "▁" + piece.upper()):
            pieces.setdefault(variant)
    return tuple(pieces)


def t5_tokenizer(num_merges: int = 4000, model_max_length: int = 512) -> T5TokenizerFast:
    """A T5-style Unigram tokenizer (<pad>=0, </s>=1, <unk>=2, "</s>" appended), offline; pieces from CLIP's BPE.

    Scores follow a Zipf law over the BPE merge order (earlier merge = more frequent piece), so Viterbi prefers whole
    words and frequent pieces, as a trained SentencePiece model does.
    """
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, -math.log(rank + 2.0)) for rank, piece in enumerate(_sentencepiece_pieces(num_merges))]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


@lru_cache
def _gemma_vocab_and_merges(num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Gemma's layout (<pad>=0, <eos>=1, <bos>=2, <unk>=3, byte tokens) over the pieces; merges read off the vocabulary
    (every split of a piece into two known pieces, ranked by the merged piece), as transformers' SentencePiece converter does."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    pieces = _sentencepiece_pieces(num_merges)
    vocab = {token: i for i, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + list(pieces))}
    merges = sorted(
        ((piece[:cut], piece[cut:]) for piece in pieces for cut in range(1, len(piece)) if piece[:cut] in vocab and piece[cut:] in vocab),
        key=lambda pair: (vocab[pair[0] + pair[1]], vocab[pair[0]], vocab[pair[1]]),
    )
    return vocab, merges


def gemma_tokenizer(num_merges: int = 4000, model_max_length: int = 8192) -> GemmaTokenizerFast:
    """A Gemma-style BPE tokenizer (byte fallback, "▁" for spaces, <bos> prepended), offline; pieces from CLIP's BPE."""
    vocab, merges = _gemma_vocab_and_merges(num_merges)
    return GemmaTokenizerFast(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length, add_bos_token=True, add_eos_token=False)

"""The CLIP BPE tokenizer, offline: built from the vocabulary that ships inside open-clip-torch
(same ids as open_clip's; no download)."""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple:
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - core dependency
        raise ImportError("the CLIP vocabulary ships with open-clip-torch: pip install open-clip-torch") from exc
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """The CLIP BPE tokenizer (49408 tokens, same ids as open_clip's), offline.  SDXL's second
    tokenizer (OpenCLIP bigG) is the same vocabulary padded with ``!`` (id 0)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length,
                        pad_token=pad_token)
    if len(tok) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tok


#: T5's special tokens as transformers' ``T5Tokenizer`` numbers them (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2).
T5_SPECIALS = (("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0))


def t5_tokenizer(num_pieces: int, model_max_length: int = 512):
    """A T5-class tokenizer (transformers' ``T5Tokenizer``: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``</s>``
    appended, 100 ``<extra_id_*>`` sentinels last), offline, for the built-in random SD 3 models.

    T5's own sentencepiece vocabulary ships in no installed package, and a random-weight T5 needs only
    ids in range, so the ``num_pieces`` pieces are the CLIP BPE vocabulary's printable-ASCII tokens in
    merge order (each also as a word-initial ``▁`` piece), scored so that fewer pieces win; single
    characters keep any text encodable.  A real model brings its own ``tokenizer_3``.
    ``len(tokenizer) = 3 + num_pieces + 100``: 32,100 for ``num_pieces=31997`` as T5 v1.1's."""
    from transformers import T5Tokenizer

    vocab, _ = _clip_vocab_and_merges()
    chars = [chr(c) for c in range(33, 127)]
    pieces = dict.fromkeys(["▁"] + chars + ["▁" + c for c in chars])
    for token in vocab:  # merge order: frequent first
        word = token.replace("</w>", "")
        if len(pieces) >= num_pieces:
            break
        if len(word) > 1 and word.isascii() and word.isprintable() and "▁" + word not in pieces:
            pieces.update(dict.fromkeys(["▁" + word, word]))
    ranked = list(pieces)[:num_pieces]
    scores = [(p, -10.0 if len(p.lstrip("▁")) <= 1 else -1.0 - i / len(ranked)) for i, p in enumerate(ranked)]
    return T5Tokenizer(vocab=list(T5_SPECIALS) + scores, model_max_length=model_max_length)

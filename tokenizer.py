"""The tokenizer: byte-level BPE whose merges are learned from the training captions.

Read `Tokenizer.encode` first: captions to rows of ids (BOS, tokens, EOS, PAD), the call data.collate
and eval.py make; `Tokenizer.learn` is where its merges come from.

CLIP tokenises captions with byte-level BPE (Radford et al. 2021, Sec. 2.4; a GPT-2-style
vocabulary). A downloaded vocabulary is not an option offline, so this one learns its merges from
the run's own captions in seconds (`Tokenizer.learn`), stores them with the run and the checkpoint
(`to_dict` / `from_dict`), and needs nothing else: text the merges do not cover stays bytes, so no
text is ever unknown. train.py builds it (`build_tokenizer`), data.collate applies it, eval.py
rebuilds it from the checkpoint.
"""
from __future__ import annotations

import array
import heapq
import re
from collections import Counter, defaultdict
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

# Merges never cross these chunks: an optional space and a run of letters, digits or non-ASCII bytes (so no
# UTF-8 character is ever split between chunks), an optional space and a run of other symbols, or spaces.
_CHUNK = re.compile(rb" ?[A-Za-z0-9\x80-\xff]+| ?[^A-Za-z0-9\x80-\xff\s]+|\s+")


class Tokenizer:
    """Byte-level BPE: UTF-8 bytes, with frequent byte sequences merged into single tokens (Sennrich et
    al. 2016; on bytes, as in GPT-2 and CLIP). The merges are learned from the training captions
    (`learn`) and stored with the run, so no vocabulary file is needed and no text is ever unknown: what
    the merges do not cover stays bytes. With no merges it is a plain byte tokenizer.

    Why merges: a shapes caption is several times shorter in BPE tokens than in bytes (results/README.md,
    "History that explains today's choices", has the counts), so the text tower costs several times less
    per caption, and it learns from the first steps (a word is one token, not a dozen bytes).

    Ids: 0..255 bytes, 256 BOS, 257 EOS, 258 PAD, 259 + k merge k. A row is BOS, ids..., EOS, PAD...
    of length context_length; truncation keeps EOS (the text tower pools there, and its causal mask
    makes what follows irrelevant) and never cuts a UTF-8 character in two.
    """

    BOS, EOS, PAD = 256, 257, 258

    def __init__(self, context_length: int = 128, merges: Sequence[Sequence[int]] = ()):
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3 (BOS, a token, EOS), got {context_length}")
        self.context_length, self.merges = context_length, []
        self.pieces = [bytes([i]) for i in range(256)] + [b"", b"", b""]     # the bytes of each id
        for k, (a, b) in enumerate(merges):
            if not all(type(x) is int and (x < 256 or 259 <= x < 259 + k) and x >= 0 for x in (a, b)):
                raise ValueError(f"merge {k} {(a, b)} names an id that is neither a byte nor an earlier merge")
            self.merges.append((a, b))
            self.pieces.append(self.pieces[a] + self.pieces[b])
        self.rank = {pair: k for k, pair in enumerate(self.merges)}
        self.vocab_size = len(self.pieces)
        self._cache: dict[bytes, list[int]] = {}

    @classmethod
    def learn(cls, texts: Iterable[str], vocab_size: int, context_length: int) -> Tokenizer:
        """Merge the most frequent adjacent pair of tokens (ties: the smallest pair) again and again,
        until vocab_size ids exist or no pair occurs twice. Deterministic. Each distinct chunk is kept
        once with its count, and a merge revisits only the chunks that hold its pair, updating the
        pair counts by difference: thousands of merges over 100k captions take seconds."""
        freq = Counter(chunk for text in texts for chunk in _CHUNK.findall(_utf8(text)))
        words, counts = [list(w) for w in freq], list(freq.values())
        pairs: Counter = Counter()
        where: dict[tuple[int, int], set[int]] = defaultdict(set)      # pair -> chunks that may hold it
        for w, ids in enumerate(words):
            for pair in zip(ids, ids[1:]):
                pairs[pair] += counts[w]
                where[pair].add(w)
        heap = [(-n, pair) for pair, n in pairs.items()]
        heapq.heapify(heap)
        merges: list[tuple[int, int]] = []
        while 259 + len(merges) < vocab_size and heap:
            n, pair = heapq.heappop(heap)
            if -n != pairs[pair]:
                continue                                  # an outdated count; the current one is queued
            if -n < 2:
                break
            merges.append(pair)
            changed = set()
            for w in where.pop(pair):
                old, ids = words[w], _merge(words[w], pair, 258 + len(merges))
                words[w] = ids
                for p in zip(old, old[1:]):
                    pairs[p] -= counts[w]
                for p in zip(ids, ids[1:]):
                    pairs[p] += counts[w]
                    where[p].add(w)
                changed.update(zip(old, old[1:]), zip(ids, ids[1:]))
            for p in changed:
                heapq.heappush(heap, (-pairs[p], p))
        return cls(context_length, merges)

    def tokens(self, text: str | bytes) -> list[int]:
        """Ids of one text, without BOS/EOS, untruncated."""
        data = _utf8(text)
        if not self.merges:
            return list(data)
        ids, cached = [], self._cache.get
        for chunk in _CHUNK.findall(data):
            ids += cached(chunk) or self._chunk(chunk)
        return ids

    def _chunk(self, chunk: bytes) -> list[int]:
        """Apply the earliest-learned merge that occurs, until none does (memoised: words repeat)."""
        ids = list(chunk)
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.rank.get(p, len(self.rank)))
            if pair not in self.rank:
                break
            ids = _merge(ids, pair, 259 + self.rank[pair])
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def encode(self, texts: str | bytes | Sequence[str | bytes]) -> Tensor:
        """Text(s) -> LongTensor (N, context_length); a single str/bytes gives N = 1."""
        if isinstance(texts, (str, bytes, bytearray)):
            texts = [texts]
        width, flat = self.context_length, array.array("q")       # all rows, one conversion at the end
        for text in texts:
            ids = self.tokens(text)
            if len(ids) > width - 2:     # keep EOS; back off while the first dropped token continues a character
                cut = width - 2
                while cut > width - 5 and cut > 0 and self.pieces[ids[cut]][0] & 0xC0 == 0x80:
                    cut -= 1
                ids = ids[:cut]
            flat.append(self.BOS)
            flat.extend(ids)
            flat.append(self.EOS)
            flat.extend([self.PAD] * (width - 2 - len(ids)))
        return torch.frombuffer(flat, dtype=torch.long).clone().view(len(texts), width) if texts \
            else torch.empty(0, width, dtype=torch.long)

    @classmethod
    def trim(cls, ids: Tensor) -> Tensor:
        """Cut a batch (N, L) after its longest caption: the columns that are PAD in every row cannot
        change the EOS-pooled embedding, only cost compute. Call on CPU ids (no device sync)."""
        return ids[:, : int((ids != cls.PAD).sum(1).max())]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """One row of ids -> text, for display; stops at EOS; invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one row of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            if i == self.EOS:
                break
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary of size {self.vocab_size}")
            out += self.pieces[i]                         # BOS and PAD have no bytes
        return out.decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint stores to rebuild this tokenizer exactly: plain ints and lists."""
        return {"context_length": self.context_length, "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tokenizer:
        try:
            return cls(d["context_length"], [tuple(m) for m in d["merges"]])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a stored tokenizer ({type(e).__name__}: {e})") from None


def _utf8(text: str | bytes) -> bytes:
    # errors="replace": a lone surrogate (e.g. from a file name) becomes "?" instead of a crash
    return text.encode("utf-8", errors="replace") if isinstance(text, str) else bytes(text)


def _merge(ids: list[int], pair: tuple[int, int], new: int) -> list[int]:
    """ids with each occurrence of `pair`, left to right without overlaps, replaced by `new`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out

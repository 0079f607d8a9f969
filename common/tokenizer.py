"""CLIP's byte-level BPE tokenizer, a BPE learner, and the synthetic world's small tokenizer (standard library only).

Reproduces OpenAI CLIP / OpenCLIP `SimpleTokenizer` (Radford et al. 2021, arXiv:2103.00020, §2.4: "lower-cased byte pair
encoding ... with a 49,152 vocab size ... bracketed with [SOS] and [EOS] tokens"; BPE: Sennrich et al. 2016,
arXiv:1508.07909; byte-level alphabet: GPT-2, Radford et al. 2019):

    tok = Tokenizer.from_file("bpe_simple_vocab_16e6.txt.gz")   # the merges file users have from CLIP / open_clip
    tok("a photo of a cat.")   # LongTensor (1, 77): [[49406, 320, 1125, 539, 320, 2368, 269, 49407, 0, ...]]
    tok.encode("a cat")        # [320, 2368]            (no SOT/EOT, like CLIP's encode)
    tok.decode(tok("a cat")[0])  # "a cat"
    wt = world_tokenizer()     # 802-token vocabulary learned from the synthetic world's captions, context 32

Pipeline (CLIP's order): clean (ftfy stand-in, html-unescape x2, whitespace collapse, lower-case) -> pre-tokenize with
CLIP's pattern `<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+` -> UTF-8 bytes
of each piece mapped through GPT-2's bytes_to_unicode table -> BPE on the piece with `</w>` on its last symbol, applying
the lowest-ranked merge present until none applies -> ids. Vocabulary (ids in this order): 256 byte chars, the same
256 with `</w>`, one entry per merge (its concatenation), `<start_of_text>`, `<end_of_text>`. With CLIP's file and its
standard slice `merges[1:49152-256-2+1]` (48,894 merges) that is 49,408 ids, SOT=49406, EOT=49407. Batches are
`[SOT] + ids + [EOT]`, truncated to the context length with EOT forced into the last slot, then zero-padded.

Known deviations from CLIP (which needs the `ftfy` and `regex` packages, neither allowed here):
- ftfy.fix_text is replaced by a stdlib subset of its default fixes: html unescape (when the text has no '<'), ANSI
  terminal escapes removed, mojibake repair for UTF-8 mis-decoded as cp1252/Latin-1 ("cafÃ©" -> "café", "itâ€™s" ->
  "it's"; `fix_mojibake` says which cases), C1 controls read as Windows-1252, Latin ligatures split (U+FB01 -> "fi"),
  full-width characters made half-width, curly quotes straightened, lone surrogates -> U+FFFD, control characters
  removed, NFC. NOT done: ftfy's badness scoring, other codecs and its rarer heuristics, so some broken text can
  tokenize differently. Clean ASCII/UTF-8 text is unaffected.
- `\\p{L}` / `\\p{N}` / `\\s` (the `regex` package) are rebuilt for stdlib `re` as explicit character classes from
  `unicodedata` general categories (L* and N*) and the Unicode White_Space list. The naive `[^\\W\\d_]` would count
  No/Nl characters ('²', '½', 'Ⅻ') as letters and `\\d` misses them as numbers; `re`'s `\\s` also matches U+001C-U+001F.
  Cross-checked against `regex` 2026.11.19 with CLIP's pattern on every code point (in context, raw and cleaned)
  and 100k random mixed-script strings: identical, except for the ~27k code points that are unassigned in Python
  3.11's Unicode 14 database but assigned in `regex`'s newer tables (they fall into the "other" class here).
  U+0345 is dropped as CLIP drops it (an IGNORECASE quirk of `regex`, see pretokenize_pattern).
- `decode` drops SOT/EOT/padding and returns words joined by single spaces without a trailing space (CLIP keeps the
  specials and a trailing space); it also does not turn a literal "</w>" typed inside the text into a space.

World vocabulary: `common/world_bpe.txt` is generated, deterministic, from the world's train captions + alt-texts:
    python -m common.tokenizer learn --out common/world_bpe.txt --merges 1500 --n 20000
The world's whole vocabulary saturates at 288 merges (802 ids: every caption/alt-text word is one token, digits are
single pieces in CLIP's pre-tokenizer), so --merges is an upper bound. If the world's vocabulary changes, rerun the
command (tests/test_tokenizer.py checks that every shape/colour/size/texture is one token); words unseen at learn
time still encode, falling back to byte symbols. Note: ~20% of world captions are longer than 32 tokens (max ~45
with SOT/EOT) and are truncated by the default context length of 32.
"""
import argparse
import array
import functools
import gzip
import heapq
import html
import re
import sys
import unicodedata
from pathlib import Path

import torch

SOT, EOT = "<start_of_text>", "<end_of_text>"
CLIP_NUM_MERGES = 49152 - 256 - 2  # CLIP reads lines[1:49152-256-2+1] of its merges file: 48,894 merges
WORLD_BPE = Path(__file__).with_name("world_bpe.txt")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Unicode White_Space (what `regex` matches with \s); stdlib `re` \s also takes U+001C-U+001F.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.lru_cache()
def bytes_to_unicode():
    """GPT-2's reversible byte -> printable-char map: printable Latin-1 bytes map to themselves, the other 68 bytes
    (controls, space, soft hyphen, ...) to chr(256 + k), so that BPE symbols never contain whitespace. Dict order
    (printable first, then the rest ascending) is the order of vocabulary ids 0..255."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_B2U = bytes_to_unicode()
_U2B = {c: b for b, c in _B2U.items()}
_LATIN1_TO_SYMBOL = {b: c for b, c in _B2U.items()}  # str.translate table on latin-1-decoded bytes


def _byte_encode(piece):
    """A text piece -> its UTF-8 bytes as bytes_to_unicode symbols (C-speed via latin-1 + translate)."""
    return piece.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_SYMBOL)


# ----------------------------------------------------------------------------------------------------- cleaning

def _compose(tables):
    """One str.translate table equal to applying `tables` one after the other."""
    out = {}
    for t in tables:
        for k in t:
            out.setdefault(k, chr(k))
    for k in out:
        s = chr(k)
        for t in tables:
            s = s.translate(t)
        out[k] = s
    return out


@functools.lru_cache()
def _fix_table():
    """ftfy.fix_text's character-level default fixes, in ftfy's order (see module docstring)."""
    c1 = {}
    for b in range(0x80, 0xA0):  # fix_c1_controls: C1 controls are Windows-1252 bytes decoded as Latin-1
        try:
            c1[b] = bytes([b]).decode("cp1252")
        except UnicodeDecodeError:  # 0x81 0x8d 0x8f 0x90 0x9d: undefined in cp1252, kept ("sloppy" codec)
            pass
    lig = {ord(c): unicodedata.normalize("NFKC", c) for c in "ĲĳŉǄǅǆǇǈǉǊǋǌǱǲǳﬀﬁﬂﬃﬄﬅﬆ"}  # fix_latin_ligatures
    lig[ord("ﬅ")] = "ſt"  # ftfy keeps the long s
    width = {0x3000: " "}  # fix_character_width
    for i in range(0xFF01, 0xFFF0):
        alt = unicodedata.normalize("NFKC", chr(i))
        if alt != chr(i):
            width[i] = alt
    quotes = {ord(c): "'" for c in "\u02bc\u2018\u2019\u201a\u201b"}  # uncurl_quotes
    quotes.update({ord(c): '"' for c in "\u201c\u201d\u201e\u201f"})
    ctrl = [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
    return _compose([c1, lig, width, quotes, {i: None for i in ctrl}])


# ------------------------------------------------------------------------------------------ mojibake repair
# UTF-8 text decoded as Windows-1252 (or Latin-1) turns each multi-byte character into 2-4 characters: "é" (C3 A9)
# becomes "Ã©", "’" (E2 80 99) becomes "â€™". A lead byte C2-DF / E0-EF / F0-F4 then shows as Â-ß / à-ï / ð-ô and a
# continuation byte 80-BF as one of 64 cp1252 characters ("sloppy" cp1252: the 5 bytes cp1252 leaves undefined,
# 81 8D 8F 90 9D, and Latin-1 decoding give C1 controls U+0080-U+009F instead).

def _sloppy_cp1252():
    """char -> byte for the decoders that make mojibake: cp1252 where defined, Latin-1 (C1 controls) as well."""
    enc = {chr(b): b for b in range(256)}                   # Latin-1
    for b in range(0x80, 0xA0):
        try:
            enc[bytes([b]).decode("cp1252")] = b
        except UnicodeDecodeError:
            pass
    return enc


_TO_BYTE = _sloppy_cp1252()
_CONT = "".join(sorted(re.escape(c) for c, b in _TO_BYTE.items() if 0x80 <= b <= 0xBF))
_SEQ = f"[\u00c2-\u00df][{_CONT}]|[\u00e0-\u00ef][{_CONT}]{{2}}|[\u00f0-\u00f4][{_CONT}]{{3}}"  # 2/3/4-byte forms
_SEQ_RE = re.compile(_SEQ)
_MOJIBAKE_RE = re.compile(f"(?:{_SEQ})+")  # runs of them: several in a row mark a mis-decoded word


def _repair_run(m):
    """One run of consecutive mojibake-shaped sequences -> repaired text, sequence by sequence.

    A sequence is replaced only when its bytes are valid UTF-8 (Python's strict decoder: no overlong forms, no
    surrogates) and the character is not a control / private-use one. Two-byte sequences are where
    real text can look like mojibake (an upper-case Latin-1 letter before a symbol: "CAFÉ…", "«ÉTÉ»", "Fuß“"):
    they are replaced when the lead is Â/Ã/Ä/Å (UTF-8 for U+0080-U+017F: Latin-1 letters and symbols, Latin
    Extended-A, by far the common case) or when the run holds several sequences (Greek, Cyrillic, Hebrew,
    Arabic words: "ÐŸÑ€Ð¸Ð²ÐµÑ‚"). A legitimate Latin-1 text would need Â-Å right before one of the 64 symbol/C1
    characters to be touched."""
    run = m.group()
    seqs = _SEQ_RE.findall(run)
    out = []
    for q in seqs:
        try:
            c = bytes(_TO_BYTE[ch] for ch in q).decode("utf-8")
        except UnicodeDecodeError:
            out.append(q)
            continue
        # controls, private use and surrogates are never the intended text; unassigned is allowed for 4 bytes only
        # (emoji newer than Python's Unicode tables); format characters (BOM, zero-width joiner) are kept
        bad = ("Cc", "Co", "Cs") if len(q) == 4 else ("Cc", "Co", "Cs", "Cn")
        ok = unicodedata.category(c) not in bad and (len(q) > 2 or q[0] in "ÂÃÄÅ" or len(seqs) > 1)
        out.append(c if ok else q)
    return "".join(out)


def fix_mojibake(text):
    """Undo UTF-8 read as cp1252 / Latin-1 (what ftfy.fix_text's fix_encoding does in the common cases):
    "cafÃ©" -> "café", "itâ€™s" -> "it’s", "Ã¼ber" -> "über", "ðŸ˜€" -> "😀", "Ð¿Ñ€Ð¸Ð²ÐµÑ‚" -> "привет". Repeated
    (at most 3 times) for text that was mis-decoded twice ("ÃƒÂ©" -> "Ã©" -> "é"). Text without such sequences is
    returned unchanged. Not done (ftfy does them): mojibake whose non-breaking space became a plain space ("Ã "
    for "à"), other codecs (MacRoman, cp437, ...), and ftfy's badness scoring for the ambiguous cases."""
    if text.isascii():
        return text
    for _ in range(3):
        new = _MOJIBAKE_RE.sub(_repair_run, text)
        if new == text:
            break
        text = new
    return text


_ANSI_RE = re.compile("\x1b\\[((?:\\d|;)*)([a-zA-Z])")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_WS_RE = re.compile(f"[{_WS}]+")


def fix_text(text):
    """Stdlib stand-in for ftfy.fix_text (see the module docstring), in ftfy's order: html, terminal escapes,
    encoding (mojibake), then the character-level fixes."""
    if "<" not in text:  # ftfy's unescape_html="auto"
        text = html.unescape(text)
    if "\x1b" in text:
        text = _ANSI_RE.sub("", text)
    text = fix_mojibake(text)  # before the C1-control fix: "â€\x9d" (a mis-decoded ”) still holds U+009D here
    text = text.translate(_fix_table())
    if _SURROGATE_RE.search(text):  # join valid pairs, lone surrogates -> U+FFFD (they cannot be UTF-8 encoded)
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return unicodedata.normalize("NFC", text)


def clean_text(text):
    """CLIP's `clean='lower'`: ftfy, html.unescape twice, strip, collapse whitespace runs to one space, lower-case."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    return _WS_RE.sub(" ", text).strip().lower()


# ------------------------------------------------------------------------------------------------ pre-tokenizer

def _ranges(chars):
    """Sorted code points -> an `re` character-class body of \\U ranges."""
    out, start, prev = [], None, None
    for c in chars:
        if start is None:
            start = prev = c
        elif c == prev + 1:
            prev = c
        else:
            out.append((start, prev))
            start = prev = c
    if start is not None:
        out.append((start, prev))
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in out)


@functools.lru_cache()
def pretokenize_pattern():
    """CLIP's split pattern for stdlib `re`: \\p{L} and \\p{N} as explicit classes built once (~0.3 s) from the
    general categories L* / N* in Python's unicodedata; \\s as Unicode White_Space."""
    # all code points as one str (array -> UTF-32 is ~5x faster than joining chr()s), then only the runs of
    # `re` word characters (letters, numerics, '_') are inspected: isalpha() is exactly category L*
    codes = array.array("I", range(sys.maxunicode + 1))
    assert codes.itemsize == 4
    s = codes.tobytes().decode(f"utf-32-{'le' if sys.byteorder == 'little' else 'be'}", "surrogatepass")
    L, N = [], []
    for m in re.finditer(r"[^\W_]+", s):
        a, run = m.start(), m.group()
        if run.isalpha():
            L.extend(range(a, a + len(run)))
            continue
        for j, c in enumerate(run):
            k = unicodedata.category(c)[0]
            if k == "L":
                L.append(a + j)
            elif k == "N":
                N.append(a + j)
    L, N = _ranges(L), _ranges(N)
    # CLIP compiles with IGNORECASE. Only the literals need it: `regex` applies no case folding to \p{L}/\p{N},
    # while stdlib `re` would also let the letter class take U+0345 (combining ypogegrammeni, Mn, folds to iota).
    # `regex` does exclude U+0345 from the negated class by folding, so CLIP silently drops it; we do the same.
    lit = "|".join([re.escape(SOT), re.escape(EOT), *_CONTRACTIONS])
    return re.compile(f"(?i:{lit})|[{L}]+|[{N}]|[^{_WS}{L}{N}\u0345]+")


def pretokenize(text):
    """Cleaned text -> CLIP's pieces (words, single digits, punctuation runs, contractions, specials)."""
    return pretokenize_pattern().findall(text)


# ------------------------------------------------------------------------------------------------------- BPE

def _merge(word, a, b):
    """Replace every non-overlapping (a, b) in `word`, left to right, by a+b (CLIP's inner loop)."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _symbols(piece):
    """Byte-encoded piece -> initial symbols, the last one marked as a word end."""
    return list(piece[:-1]) + [piece[-1] + "</w>"]


class Tokenizer:
    """Byte-level BPE as in CLIP. merges: list of (first, second) in rank order. vocab: optional list of token strings
    (id = position); default CLIP's layout 256 bytes + 256 `</w>` bytes + merges + SOT + EOT."""

    def __init__(self, merges, context_length=77, vocab=None):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {context_length}")
        self.context_length = int(context_length)
        self.merges = [tuple(m) for m in merges]
        base = list(_B2U.values())
        base = base + [c + "</w>" for c in base]
        known = set(base)
        for r, m in enumerate(self.merges):
            if len(m) != 2 or m[0] not in known or m[1] not in known:
                raise ValueError(f"merge #{r} {m!r}: expected two symbols already in the vocabulary (byte chars, "
                                 "'</w>' ends or earlier merges)")
            known.add(m[0] + m[1])
        if vocab is None:
            vocab = base + [a + b for a, b in self.merges] + [SOT, EOT]
        self.vocab = list(vocab)
        self.encoder = {t: i for i, t in enumerate(self.vocab)}  # a repeated string keeps its last id, as in CLIP
        missing = [t for t in (SOT, EOT) if t not in self.encoder] or sorted(known - self.encoder.keys())[:5]
        if missing:
            raise ValueError(f"vocab: tokens {missing} missing (needs SOT, EOT, all byte symbols and every merge)")
        self.bpe_ranks = {m: r for r, m in enumerate(self.merges)}
        self.sot_token_id = self.encoder[SOT]
        self.eot_token_id = self.encoder[EOT]
        self.vocab_size = len(self.vocab)
        # word-level cache: captions repeat a small vocabulary, so nearly every piece is a hit
        self._piece_ids = functools.lru_cache(maxsize=1 << 18)(self._piece_ids_uncached)

    @classmethod
    def from_file(cls, path, context_length=77, max_merges=CLIP_NUM_MERGES):
        """Load a merges file (.txt or .txt.gz): a `#version` header line, then one `first second` merge a line.
        Only the first `max_merges` are used (CLIP's slice for its 49,408-token vocabulary); learned files are
        shorter and load whole."""
        return cls(read_merges(path, max_merges), context_length=context_length)

    def bpe(self, piece):
        """Byte-encoded piece -> list of BPE symbols: repeatedly merge the lowest-ranked adjacent pair present."""
        word = _symbols(piece)
        ranks = self.bpe_ranks
        while len(word) > 1:
            best, best_r = None, None
            for p in zip(word, word[1:]):
                r = ranks.get(p)
                if r is not None and (best_r is None or r < best_r):
                    best, best_r = p, r
            if best is None:
                break
            word = _merge(word, *best)
        return word

    def _piece_ids_uncached(self, piece):
        if piece == SOT or piece == EOT:  # CLIP matches the special strings in text as the special tokens
            return (self.encoder[piece],)
        return tuple(self.encoder[s] for s in self.bpe(_byte_encode(piece)))

    def encode(self, text):
        """str -> list of token ids (cleaned, no SOT/EOT, no truncation)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}: {text!r:.80}")
        ids = []
        for piece in pretokenize(clean_text(text)):
            ids.extend(self._piece_ids(piece))
        return ids

    def decode(self, ids):
        """ids (list or 1-D tensor) -> text. Stops at the first EOT (the rest is padding), drops SOT and trailing
        zero padding; every `</w>` ends a word (a space). Invalid UTF-8 (a cut multi-byte char) becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        ids = [int(i) for i in ids]
        if self.eot_token_id in ids:
            ids = ids[:ids.index(self.eot_token_id)]
        else:
            while ids and ids[-1] == 0:
                ids.pop()
        out = bytearray()
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"decode: id {i} outside the vocabulary [0, {self.vocab_size})")
            t = self.vocab[i]
            if t == SOT or t == EOT:
                continue
            end = t.endswith("</w>")
            out += bytes(_U2B[c] for c in (t[:-4] if end else t))
            if end:
                out += b" "
        return out.decode("utf-8", errors="replace").rstrip(" ")

    def __call__(self, texts, context_length=None):
        """str | list[str] -> LongTensor (B, L): SOT ids EOT 0 0 ...; longer texts are cut to L with EOT last."""
        if isinstance(texts, str):
            texts = [texts]
        L = self.context_length if context_length is None else int(context_length)
        if L < 2:
            raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {L}")
        flat = []
        for t in texts:
            ids = [self.sot_token_id] + self.encode(t) + [self.eot_token_id]
            if len(ids) > L:
                ids = ids[:L]
                ids[-1] = self.eot_token_id
            flat.extend(ids)
            flat.extend([0] * (L - len(ids)))
        return torch.tensor(flat, dtype=torch.long).view(len(texts), L)

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, context_length={self.context_length})"


def read_merges(path, max_merges=None):
    """Merges file -> list of (first, second). Gzip is detected from the content, not the name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"merges file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    lines = raw.decode("utf-8").split("\n")
    start = 1 if lines and "#version" in lines[0] else 0  # CLIP's header: '"bpe_simple_vocab_16e6.txt#version: 0.2'
    merges = []
    for n, line in enumerate(lines[start:], start + 1):
        if max_merges is not None and len(merges) >= max_merges:
            break
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected a merge 'first second', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def save_merges(path, merges):
    """Write merges in CLIP's format: a `#version: 0.2` header, then `first second` per line (plain text)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"{a} {b}\n" for a, b in merges)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("#version: 0.2\n" + body, encoding="utf-8")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------- learning

def learn_bpe(corpus, num_merges, min_count=2):
    """Standard BPE (Sennrich et al. 2016, Alg. 1) on CLIP's pieces: count pieces of the cleaned corpus, start from
    byte symbols with `</w>` on the last, and repeatedly merge the most frequent adjacent pair (pair occurrences
    weighted by piece frequency) everywhere. Ties go to the lexicographically smallest pair, so the result depends
    only on the multiset of pieces. Stops early when the best pair occurs fewer than `min_count` times.
    corpus: iterable of str (or one str). Returns list of (first, second) in rank order."""
    if isinstance(corpus, str):
        corpus = [corpus]
    counts = {}
    for text in corpus:
        for piece in pretokenize(clean_text(text)):
            if piece not in (SOT, EOT):
                s = _byte_encode(piece)
                counts[s] = counts.get(s, 0) + 1
    words = [_symbols(s) for s in sorted(counts)]
    freq = [counts[s] for s in sorted(counts)]
    pair_n, where = {}, {}  # pair -> weighted count; pair -> indices of words holding it

    def add(k, sign):
        w, f = words[k], freq[k] * sign
        for p in zip(w, w[1:]):
            pair_n[p] = pair_n.get(p, 0) + f
            if sign > 0:
                where.setdefault(p, set()).add(k)

    for k in range(len(words)):
        add(k, 1)
    heap = [(-n, p) for p, n in pair_n.items()]  # lazy max-heap: stale entries are skipped when popped
    heapq.heapify(heap)
    merges = []
    while len(merges) < num_merges and heap:
        negn, p = heapq.heappop(heap)
        if pair_n.get(p, 0) != -negn:
            continue
        if -negn < min_count:
            break
        merges.append(p)
        touched = set()
        for k in sorted(where.pop(p)):
            old = set(zip(words[k], words[k][1:]))
            add(k, -1)
            words[k] = _merge(words[k], *p)
            add(k, 1)
            new = set(zip(words[k], words[k][1:]))
            for q in old - new:
                if q in where:
                    where[q].discard(k)
            touched |= old | new
        pair_n.pop(p, None)
        for q in touched:
            n = pair_n.get(q, 0)
            if n <= 0:
                pair_n.pop(q, None)
                where.pop(q, None)
            elif q != p:
                heapq.heappush(heap, (-n, q))
    return merges


# -------------------------------------------------------------------------------------------- world tokenizer

@functools.lru_cache()
def _world_merges(path):
    return tuple(read_merges(path))


def world_tokenizer(context_length=32):
    """The synthetic world's tokenizer: merges learned from its captions and alt-texts (common/world_bpe.txt)."""
    if not WORLD_BPE.is_file():
        raise FileNotFoundError(f"{WORLD_BPE} is missing; generate it with "
                                "`python -m common.tokenizer learn --out common/world_bpe.txt --merges 1500`")
    return Tokenizer(_world_merges(str(WORLD_BPE)), context_length=context_length)


def world_corpus(n=20000, seed=0, split="train"):
    """Captions and alt-texts of the first n samples of World(seed, split) (2n strings)."""
    from common.world import World  # imported here: the tokenizer itself needs only the standard library + torch
    w = World(seed=seed, split=split, size=32, n=n)
    out = []
    for i in range(n):
        s = w[i]
        out += [s["caption"], s["alt_text"]]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m common.tokenizer", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("learn", help="learn a merges file from the synthetic world's captions + alt-texts")
    a.add_argument("--out", default=str(WORLD_BPE), help="merges file to write (default common/world_bpe.txt)")
    a.add_argument("--merges", type=int, default=1500, help="number of merges to learn")
    a.add_argument("--n", type=int, default=20000, help="world train samples (each gives a caption and an alt-text)")
    a.add_argument("--seed", type=int, default=0, help="world seed")
    a.add_argument("--split", default="train", help="world split")
    e = sub.add_parser("encode", help="print token ids of texts")
    e.add_argument("texts", nargs="+")
    e.add_argument("--bpe", default=str(WORLD_BPE), help="merges file (.txt or .txt.gz)")
    e.add_argument("--context-length", type=int, default=None, help="pad/truncate to this length")
    args = ap.parse_args(argv)
    if args.cmd == "learn":
        import time
        t0 = time.time()
        corpus = world_corpus(args.n, args.seed, args.split)
        merges = learn_bpe(corpus, args.merges)
        save_merges(args.out, merges)
        tok = Tokenizer(merges)
        L = max(len(tok.encode(t)) + 2 for t in corpus)
        print(f"learned {len(merges)} merges from {len(corpus)} texts -> {args.out} (vocab_size {tok.vocab_size}, "
              f"longest text {L} tokens with SOT/EOT, {time.time() - t0:.1f}s)")
    else:
        tok = Tokenizer.from_file(args.bpe)
        for t in args.texts:
            ids = tok(t, args.context_length)[0].tolist() if args.context_length else tok.encode(t)
            print(" ".join(map(str, ids)))


if __name__ == "__main__":
    main()


def tokenizer_for(vocab_size, context_length, bpe="", name="checkpoint"):
    """The tokenizer a loaded checkpoint's text tower needs: CLIP's BPE from the merges file `bpe`, else the world's
    when the checkpoint's vocabulary is exactly the world's. Anything else is a one-line error naming `name`."""
    from common.convert import CheckpointError
    tok = Tokenizer.from_file(bpe, context_length=context_length) if bpe else world_tokenizer(context_length)
    if tok.vocab_size > vocab_size or (not bpe and tok.vocab_size != vocab_size):
        raise CheckpointError(f"{name}: its token_embedding has {vocab_size} rows but the "
                              f"{'--bpe ' + bpe if bpe else 'world'} tokenizer has {tok.vocab_size} ids"
                              + ("" if bpe else "; pass --bpe=bpe_simple_vocab_16e6.txt.gz (CLIP's merges file)"))
    return tok

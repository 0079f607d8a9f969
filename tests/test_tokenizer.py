"""Tests for common/tokenizer.py: CLIP byte-level BPE, the BPE learner, the shipped world tokenizer."""
import gzip
import random
import time

import pytest
import torch

from common import tokenizer as T
from common.tokenizer import (SOT, EOT, Tokenizer, bytes_to_unicode, clean_text, learn_bpe, pretokenize, read_merges,
                              save_merges, world_tokenizer)

# --------------------------------------------------------------------------------------- tiny hand-written file
# Base ids (bytes_to_unicode order): printable ASCII c -> ord(c) - 33; the same with '</w>' -> + 256.
# Merges get 512, 513, ...; then SOT, EOT.
TINY = [("l", "o"), ("lo", "w</w>"), ("e", "r</w>"), ("lo", "w")]  # -> 512 "lo", 513 "low</w>", 514 "er</w>", 515 "low"


def b(c, end=False):
    return ord(c) - 33 + (256 if end else 0)


@pytest.fixture()
def tiny(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("#version: 0.2\n" + "".join(f"{a} {c}\n" for a, c in TINY), encoding="utf-8")
    return Tokenizer.from_file(p, context_length=8)


def test_bytes_to_unicode_table():
    t = bytes_to_unicode()
    assert len(t) == 256 and len(set(t.values())) == 256
    assert t[ord("!")] == "!" and t[ord("a")] == "a" and t[ord("~")] == "~"
    assert t[32] == chr(256 + 32) == "Ġ"  # space is remapped (0..32 come first among the non-printables)
    assert t[0] == chr(256) and t[127] == chr(256 + 33) and t[173] == chr(256 + 67)
    assert not any(c.isspace() for c in t.values())
    assert list(t.values())[:3] == ["!", '"', "#"]  # dict order = vocabulary ids


def test_tiny_file_exact_ids(tiny):
    assert tiny.vocab_size == 512 + 4 + 2 and (tiny.sot_token_id, tiny.eot_token_id) == (516, 517)
    assert tiny.encode("low") == [513]                      # l o w</w> -> lo w</w> -> low</w>
    assert tiny.encode("lower") == [515, 514]               # rank 2 (e r</w>) before rank 3 (lo w)
    assert tiny.encode("lol") == [512, b("l", True)]        # lo l</w>
    assert tiny.encode("row") == [b("r"), b("o"), b("w", True)]
    assert tiny.encode("  LOW!\n\ta ") == [513, b("!", True), b("a", True)]  # lower-case, whitespace, punctuation
    assert tiny.decode([516, 515, 514, 517, 0, 0]) == "lower"
    assert tiny.decode(tiny.encode("Low! lower row")) == "low ! lower row"


def test_tiny_batch_padding_and_truncation(tiny):
    x = tiny(["low", "lower"], context_length=5)
    assert x.dtype == torch.long and x.shape == (2, 5)
    assert x.tolist() == [[516, 513, 517, 0, 0], [516, 515, 514, 517, 0]]
    assert tiny("low").shape == (1, 8)  # default context length of this instance
    y = tiny("low low low low low", context_length=4)
    assert y.tolist() == [[516, 513, 513, 517]]  # cut, EOT forced into the last slot
    z = tiny("low low", context_length=4)           # exactly fits: not truncated
    assert z.tolist() == [[516, 513, 513, 517]]
    assert tiny("", context_length=4).tolist() == [[516, 517, 0, 0]]
    with pytest.raises(ValueError, match="context_length"):
        tiny("low", context_length=1)


def test_bad_merges_file(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        Tokenizer.from_file(p)
    with pytest.raises(ValueError, match="merge #1"):
        Tokenizer([("a", "b"), ("xy", "z")])       # 'xy' is not a symbol yet
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Tokenizer.from_file(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Tokenizer([]).decode([600])


# ------------------------------------------------------------------------------------------- cleaning / regex

def test_pretokenize_matches_regex_package():
    # expected values computed with the `regex` package and CLIP's pattern (see the module docstring)
    assert pretokenize("x²½ 3.14") == ["x", "²", "½", "3", ".", "1", "4"]  # No chars are numbers, one per piece
    assert pretokenize("ⅻ Ⅻ ①") == ["ⅻ", "Ⅻ", "①"]                       # Nl / No
    assert pretokenize("日本語のテキスト、漢字。") == ["日本語のテキスト", "、", "漢字", "。"]
    assert pretokenize("naïve café") == ["naïve", "café"]
    assert pretokenize("a_b") == ["a", "_", "b"]                             # '_' is not a letter (re's \w has it)
    assert pretokenize("٣٤ ४५") == ["٣", "٤", "४", "५"]
    assert pretokenize("e\u0301") == ["e", "\u0301"]                         # Mn is neither L nor N
    assert pretokenize("привет, мир!") == ["привет", ",", "мир", "!"]
    assert pretokenize("i'm they're") == ["i", "'m", "they", "'re"]
    assert pretokenize("b\u0345c") == ["b", "c"]                             # regex+IGNORECASE drops U+0345
    assert pretokenize("🐱🐶 ok") == ["🐱🐶", "ok"]
    assert pretokenize("a\u00a0b\u2009c\x1cd") == ["a", "b", "c", "\x1c", "d"]  # \x1c is not Unicode White_Space
    # the naive approximation fails exactly here, so this test can tell the two apart
    import re
    naive = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+")
    assert naive.findall("x²½ a_b") != pretokenize("x²½ a_b")


def test_clean_text():
    assert clean_text("  A\u00a0\u2009 Photo\n\tOF   a CAT.  ") == "a photo of a cat."
    assert clean_text("fish &amp;amp; chips") == "fish & chips"          # html-unescaped (twice, like CLIP)
    assert clean_text("don\u2019t \u201cquote\u201d") == "don't \"quote\""  # ftfy uncurl_quotes
    assert clean_text("\ufb01ne \uff21\uff22\uff23\uff11") == "fine abc1"  # ligature, full width
    assert clean_text("e\u0301t\u00e9") == "\u00e9t\u00e9"                    # NFC
    assert clean_text("a\x00b\x1bc\ufeff") == "abc"                        # control chars removed
    assert clean_text("x\ud83d y") == "x\ufffd y"                         # lone surrogate cannot be UTF-8: U+FFFD


def test_unknown_characters_never_crash(tiny):
    texts = ["🐱🐶👍🏽 🇩🇪 👨‍👩‍👧", "\x00\x01\x7f\x85", "\ud83d", "Ω≈ç√∫˜µ≤≥÷", "a" * 500, "", "   ", "\U0010ffff",
             "<start_of_text> <end_of_text>", "ͅ"]
    for t in texts:
        ids = tiny.encode(t)
        assert all(0 <= i < tiny.vocab_size for i in ids)
        tiny.decode(ids)
    x = tiny(texts, context_length=16)
    assert x.shape == (len(texts), 16) and (x[:, 0] == 516).all() and ((x == 517).sum(1) >= 1).all()
    # byte fallback round-trips any text (after cleaning) exactly, spaces aside
    t = "Naïve 🐱 café ½ 日本"
    assert tiny.decode(tiny.encode(t)).replace(" ", "") == clean_text(t).replace(" ", "")
    # CLIP maps the special strings inside text to the special tokens
    assert tiny.encode("<start_of_text>low") == [516, 513]


# ------------------------------------------------------------------------------------------- CLIP's real file

@pytest.fixture(scope="module")
def clip_tok(bpe_path):
    return Tokenizer.from_file(bpe_path)


def test_clip_reference_ids(clip_tok):
    tok = clip_tok
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id, len(tok.merges)) == (49408, 49406, 49407, 48894)
    x = tok("a photo of a cat.")
    assert x.shape == (1, 77)
    assert x[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407] + [0] * 69
    assert tok("Hello World!")[0, :6].tolist() == [49406, 3306, 1002, 256, 49407, 0]
    assert tok(["a diagram", "a dog", "a cat"])[:, :5].tolist() == [[49406, 320, 22697, 49407, 0],
                                                                   [49406, 320, 1929, 49407, 0],
                                                                   [49406, 320, 2368, 49407, 0]]
    assert tok.encode("the") == [518]
    assert tok.decode(x[0]) == "a photo of a cat ."


def test_clip_whole_word_ids_follow_file_lines(clip_tok, bpe_path):
    # independent of the BPE loop: a word that is one token has id 512 + (line number of its merge - 1)
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")[1:48895]
    pos = {"".join(l.split()): i for i, l in enumerate(lines)}
    for w in ["photo", "diagram", "dog", "cat", "hello", "world", "the", "circle", "square", "red", "blue"]:
        assert clip_tok.encode(w) == [512 + pos[w + "</w>"]], w


def test_clip_truncation_and_unicode(clip_tok):
    tok = clip_tok
    long = "a photo of a cat " * 30
    x = tok(long)[0]
    full = [tok.sot_token_id] + tok.encode(long) + [tok.eot_token_id]
    assert len(full) > 77 and x.tolist() == full[:76] + [49407]
    assert tok([long, "a cat"], context_length=10)[:, -1].tolist() == [49407, 0]
    for t in ["🐱 café naïve ² ½ 日本語", "Привет мир", "don’t", "\ufb01ne"]:
        ids = tok.encode(t)
        assert tok.decode(ids).replace(" ", "") == clean_text(t).replace(" ", "")
    assert tok.encode("don\u2019t") == tok.encode("don't")  # the ftfy stand-in matters for real web text
    assert tok.encode("x²") != tok.encode("x2") and len(tok.encode("x²")) >= 2


# -------------------------------------------------------------------------------------------------- learning

def naive_learn(corpus, num_merges, min_count=2):
    """Reference learner: recount every pair after every merge."""
    counts = {}
    for t in corpus:
        for p in pretokenize(clean_text(t)):
            s = T._byte_encode(p)
            counts[s] = counts.get(s, 0) + 1
    words = {s: T._symbols(s) for s in counts}
    merges = []
    while len(merges) < num_merges:
        pc = {}
        for s, w in words.items():
            for p in zip(w, w[1:]):
                pc[p] = pc.get(p, 0) + counts[s]
        if not pc:
            break
        best = min(pc, key=lambda p: (-pc[p], p))
        if pc[best] < min_count:
            break
        merges.append(best)
        words = {s: T._merge(w, *best) for s, w in words.items()}
    return merges


def test_learn_bpe_exact_small():
    assert learn_bpe(["ab ab ab abc"], 10) == [("a", "b</w>")]  # then only count-1 pairs remain
    assert learn_bpe(["ab ab ab abc"], 10, min_count=1) == [("a", "b</w>"), ("a", "b"), ("ab", "c</w>")]  # ties: smallest
    # a a a a</w> x2: (a,a) counts 4 (overlaps counted) -> "aa a a</w>"; then (aa,a) and (a,a</w>) tie at 2 and the
    # smaller pair wins -> "aa aa</w>"
    assert learn_bpe(["aaaa aaaa"], 10) == [("a", "a"), ("a", "a</w>"), ("aa", "aa</w>")]


def test_learn_bpe_matches_naive_and_is_deterministic():
    rng = random.Random(0)
    corpus = [" ".join("".join(rng.choice("aabbcd") for _ in range(rng.randint(1, 6))) for _ in range(8))
              for _ in range(150)]
    m = learn_bpe(corpus, 60)
    assert m == naive_learn(corpus, 60) and len(m) == 60
    shuffled = corpus[:]
    rng.shuffle(shuffled)
    assert learn_bpe(shuffled, 60) == m  # depends only on the multiset of words


CORPUS = ["a small red circle on the left.", "two large blue squares at the top.", "a red square behind a blue circle",
          "Red Circle Clipart HD wallpaper", "IMG_1234.jpg red star", "a medium green star, over a striped background."]


def test_learned_save_reload_roundtrip(tmp_path):
    merges = learn_bpe(CORPUS * 3, 300)
    p = tmp_path / "m.txt"
    save_merges(p, merges)
    assert p.read_text(encoding="utf-8").split("\n")[0] == "#version: 0.2"
    tok = Tokenizer.from_file(p, context_length=24)
    assert tok.merges == merges and tok.vocab_size == 512 + len(merges) + 2
    assert (tok.sot_token_id, tok.eot_token_id) == (512 + len(merges), 513 + len(merges))
    for t in CORPUS:
        assert tok.decode(tok(t)[0]).replace(" ", "") == clean_text(t).replace(" ", "")
        assert len(tok.encode(t)) == len(pretokenize(clean_text(t)))  # every seen word is one token
    gz = tmp_path / "m.txt.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    assert Tokenizer.from_file(gz).merges == merges
    assert tok.encode("purple hexagon ✨")  # unseen words fall back to bytes
    assert tok.decode(tok.encode("purple hexagon ✨")) == "purple hexagon ✨"


# ----------------------------------------------------------------------------------------------- world tokenizer

def test_world_tokenizer_shipped_file():
    from common.world import World, SHAPES, COLORS, SIZES, TEXTURES
    tok = world_tokenizer()
    merges = read_merges(T.WORLD_BPE)
    assert T.WORLD_BPE.read_text(encoding="utf-8").startswith("#version: 0.2\n")
    assert tok.context_length == 32 and tok.vocab_size == 512 + len(merges) + 2 < 4096
    for w in SHAPES + COLORS + SIZES + TEXTURES:
        assert len(tok.encode(w)) == 1, f"{w!r} is not one token: regenerate common/world_bpe.txt " \
                                        "(python -m common.tokenizer learn --out common/world_bpe.txt --merges 1500)"
    w = World(split="val", size=32, n=100)
    texts = [t for i in range(100) for t in (w[i]["caption"], w[i]["alt_text"])]
    x = tok(texts)
    assert x.shape == (200, 32)
    for t, row in zip(texts, x):
        ids = tok.encode(t)
        if len(ids) + 2 <= 32:
            assert tok.decode(row).replace(" ", "") == clean_text(t).replace(" ", "")
        else:
            assert row[-1].item() == tok.eot_token_id
    # learned from the world: text costs about one token per word
    n_pieces = sum(len(pretokenize(clean_text(t))) for t in texts)
    n_ids = sum(len(tok.encode(t)) for t in texts)
    assert n_ids <= 1.05 * n_pieces


def test_world_tokenizer_speed():
    tok = world_tokenizer()
    caps = [f"a {s} red circle at the top left, behind a {c} square, over a dotted background."
            for s in ("small", "medium", "large") for c in ("blue", "green", "pink", "black")] * 86
    caps = caps[:1024]
    tok(caps[:8])  # build the split pattern once per process (~0.3 s)
    t0 = time.perf_counter()
    x = tok(caps)
    dt = time.perf_counter() - t0
    assert x.shape == (1024, 32)
    assert dt < 1.0, f"1024 captions took {dt:.2f}s"


def test_learn_cli_matches_library(tmp_path, capsys):
    # in-process (a subprocess would pay the torch import twice); `python -m common.tokenizer` just calls main()
    out = tmp_path / "w.txt"
    T.main(["learn", "--out", str(out), "--merges", "200", "--n", "40"])
    assert "learned" in capsys.readouterr().out
    assert read_merges(out) == learn_bpe(T.world_corpus(40), 200)
    T.main(["encode", "--bpe", str(out), "--context-length", "6", "red circle"])
    ids = [int(v) for v in capsys.readouterr().out.split()]
    assert ids == Tokenizer.from_file(out)("red circle", context_length=6)[0].tolist()


# ------------------------------------------------------------------------------------------- mojibake repair

def sloppy_cp1252(b):
    """bytes -> str as a cp1252 decoder that keeps undefined bytes (81 8D 8F 90 9D) as C1 controls: how UTF-8 text
    read as Windows-1252 comes out. Used only to check that the hand-written mojibake below is what it claims."""
    out = []
    for x in b:
        try:
            out.append(bytes([x]).decode("cp1252"))
        except UnicodeDecodeError:
            out.append(chr(x))
    return "".join(out)


MOJIBAKE = [  # (as it arrives, what was meant)
    ("cafÃ©", "café"), ("itâ€™s", "it’s"), ("Ã¼ber", "über"), ("â€œquotedâ€\x9d", "“quoted”"),
    ("naÃ¯ve", "naïve"), ("SÃ£o Paulo", "São Paulo"), ("piÃ±a colada", "piña colada"), ("GrÃ¶ÃŸe", "Größe"),
    ("Ã‰cole", "École"), ("FranÃ§ais", "Français"), ("â‚¬20", "€20"), ("50Â°C", "50°C"), ("Â© 2020", "© 2020"),
    ("waitâ€¦", "wait…"), ("2â€“3", "2–3"), ("aâ€”b", "a—b"), ("â€˜hiâ€™", "‘hi’"), ("ðŸ˜€ smile", "😀 smile"),
    ("ÐŸÑ€Ð¸Ð²ÐµÑ‚", "Привет"), ("Î±Î²Î³", "αβγ"), ("æ—¥æœ¬èªž", "日本語"), ("ZaÅ¼Ã³Å‚Ä‡", "Zażółć"),
    ("ÄŸÃ¼ÅŸ", "ğüş"), ("1Â½ cups", "1½ cups"), ("Ã…ngstrÃ¶m", "Ångström"), ("a\u00c2\u00a0b", "a\u00a0b"),
    ("ï»¿BOM", "\ufeffBOM"), ("×©×œ×•×\x9d", "שלום"), ("Ù…Ø±Ø\xadØ¨Ø§", "مرحبا"), ("â„¢", "™"),
]
MOJIBAKE_OTHER = [
    ("itâ\x80\x99s", "it’s"),                            # read as Latin-1 (C1 controls) rather than cp1252
    ("cafÃƒÂ©", "café"),                                # mis-decoded twice
    ("naïve cafÃ©", "naïve café"),                       # real UTF-8 and mojibake in one string
]
LEGIT = ["Ã", "Â", "São Paulo", "naïve café", "CAFÉ…", "«ÉTÉ»", "„Fuß“", "ROMÂNIA", "¿Qué?", "50 °C ± 2",
         "© 2024 Ünïcödé", "Œuvre complète", "ÀÁÂÃÄÅ", "½ cup", "Straße", "Ñandú", "日本語", "Привет", "😀 emoji",
         "Ærøskøbing", "MÜNCHEN·BERLIN", "Þórður", "plain ascii text", "ÉTÉ™"]


def test_mojibake_cases_are_real_mojibake():
    for bad, good in MOJIBAKE:
        assert sloppy_cp1252(good.encode("utf-8")) == bad, (bad, good)
    assert "it’s".encode("utf-8").decode("latin-1") == MOJIBAKE_OTHER[0][0]
    assert sloppy_cp1252(sloppy_cp1252("café".encode("utf-8")).encode("utf-8")) == MOJIBAKE_OTHER[1][0]


def test_fix_mojibake_repairs():
    assert len(MOJIBAKE) >= 25
    for bad, good in MOJIBAKE + MOJIBAKE_OTHER:
        assert T.fix_mojibake(bad) == good, (bad, T.fix_mojibake(bad), good)
    # then the rest of CLIP's cleaning (ftfy uncurls quotes, removes the BOM; lower-case)
    assert clean_text("itâ€™s") == "it's"
    assert clean_text("â€œquotedâ€\x9d") == '"quoted"'
    assert clean_text("Ã¼ber cafÃ©") == "über café"
    assert clean_text("ï»¿BOM") == "bom"
    assert clean_text("GrÃ¶ÃŸe &amp; ÐŸÑ€Ð¸Ð²ÐµÑ‚") == "größe & привет"


def test_fix_mojibake_leaves_real_text_alone():
    assert len(LEGIT) >= 10
    for t in LEGIT:
        assert T.fix_mojibake(t) == t, t
        assert T.fix_mojibake(t.lower()) == t.lower(), t
    assert clean_text("CAFÉ… Ã") == "café… ã"


def test_fix_mojibake_changes_tokens(tiny):
    assert tiny.encode("cafÃ©") == tiny.encode("café") != tiny.encode("cafe")

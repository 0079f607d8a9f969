"""catlip.py: caption -> synset mining (hand-written WordNet fixture + real WordNet when present), vocabulary
selection, Transfer Init row mapping, one --smoke run that must learn, one 2-process torchrun smoke on exported
shards."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import catlip  # noqa: E402

# A tiny WordNet 3.0-format database. Offsets are arbitrary ids (the reader keys data lines by their own offset
# field). "photo"'s first sense belongs to the synset headed by "photograph" (the real database does the same),
# "goose"/"mouse" plurals are irregular (noun.exc), "glasses" needs the "ses" -> "s" rule (plain "s" gives "glasse"),
# "the"/"quickly" have no noun sense.
INDEX = """  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
box n 1 2 @ ~ 1 0 00000100
cross n 2 1 @ 2 0 00000200 00000201
dog n 2 1 @ 2 1 00000300 00000301
glass n 1 1 @ 1 0 00000400
goose n 1 1 @ 1 0 00000500
mouse n 1 1 @ 1 0 00000600
photo n 1 1 @ 1 0 00000700
photograph n 1 1 @ 1 0 00000700
image n 1 1 @ 1 0 00000800
church n 1 1 @ 1 0 00000900
wolf n 1 1 @ 1 0 00001000
"""
DATA = """  1 This software and database is being provided to you, the LICENSEE, by
00000100 06 n 01 box 0 000 | a container
00000200 06 n 01 cross 0 000 | a marked figure
00000201 06 n 01 cross 1 000 | a hybrid
00000300 05 n 02 dog 0 domestic_dog 0 000 | a dog
00000301 18 n 01 dog 1 000 | a cad
00000400 27 n 01 glass 0 000 | a solid
00000500 05 n 01 goose 0 000 | a bird
00000600 05 n 01 mouse 0 000 | a rodent
00000700 06 n 02 photograph 0 photo 0 000 | a picture
00000800 10 n 01 Image 0 000 | a representation
00000900 06 n 01 church 0 000 | a building
00001000 05 n 01 wolf 0 000 | an animal
"""
EXC = """geese goose
mice mouse
"""


@pytest.fixture()
def mini_wordnet(tmp_path):
    for name, text in (("index.noun", INDEX), ("data.noun", DATA), ("noun.exc", EXC)):
        (tmp_path / name).write_text(text)
    return catlip.WordNet(str(tmp_path))


def test_lemmatizer_rules_and_exceptions(mini_wordnet):
    wn = mini_wordnet
    assert wn.lemmatize("dogs") == "dog"           # "s" -> ""
    assert wn.lemmatize("boxes") == "box"          # "xes" -> "x"
    assert wn.lemmatize("crosses") == "cross"      # "ses" -> "s" (naive stemming gives "crosse")
    assert wn.lemmatize("glasses") == "glass"
    assert wn.lemmatize("churches") == "church"    # "ches" -> "ch"
    assert wn.lemmatize("wolves") == "wolf"        # NLTK's extra "ves" -> "f"
    assert wn.lemmatize("geese") == "goose" and wn.lemmatize("mice") == "mouse"   # noun.exc
    assert wn.lemmatize("quickly") == "quickly"    # unknown: the word itself


def test_caption_labels_fixture(mini_wordnet):
    wn = mini_wordnet
    cap = "Two DOGS+and%20a%20dog <b>near</b> the geese, photo of mice &amp; boxes\nquickly"
    keys = catlip.caption_labels(cap, wn)
    # duplicates collapse (DOGS, dog), exceptions and plurals map to their synset, first-sense keys are unpadded,
    # "photo" is dropped (its first synset's head lemma is "photograph"), non-nouns and HTML tags are dropped
    assert keys == ["n300", "n500", "n600", "n100"]
    assert [wn.lemma(k) for k in keys] == ["dog", "goose", "mouse", "box"]
    assert catlip.caption_labels("", wn) == [] and catlip.caption_labels(None, wn) == []
    assert catlip.caption_labels("a photograph", wn) == ["n700"]
    assert catlip.caption_labels("image", wn) == ["n800"]        # head lemma compared lower-cased ("Image")
    with pytest.raises(FileNotFoundError, match="index.noun"):
        catlip.WordNet(str(os.path.join(os.path.dirname(__file__), "no-such-dir")))


def test_caption_labels_real_wordnet(wordnet_dir):
    wn = catlip.WordNet(str(wordnet_dir))
    keys = catlip.caption_labels("Photos of two dogs, three geese and an image of crosses", wn)
    lemmas = [wn.lemma(k) for k in keys]
    assert "image" in lemmas and "dog" in lemmas and "goose" in lemmas and "cross" in lemmas
    assert "photograph" not in lemmas and "photo" not in lemmas
    assert wn.key("image") == "n5928118"           # clip-family.md §2.2: unpadded offset
    assert wn.key("the") is None and wn.key("a") is None   # "a" -> angstrom.n.01: head lemma differs
    # the world lexicon's colour/size words are WordNet nouns kept by corenet's rule (why WorldLexicon has them)
    assert all(wn.key(w) is not None for w in catlip.COLORS + catlip.SIZES)


def test_world_lexicon():
    lex = catlip.WorldLexicon()
    assert catlip.caption_labels("Two Red CROSSES and a small cross, IMG_2041.jpg stock photo", lex) == \
        ["red", "cross", "small", "stock", "photo"]


def test_select_vocab_threshold_and_topk():
    c = Counter({"a": 5, "b": 9, "c": 5, "d": 1})
    assert catlip.select_vocab(c, min_count=2) == ["b", "a", "c"]        # by count, ties by key
    assert catlip.select_vocab(c, min_count=1, top_k=2) == ["b", "a"]
    assert catlip.select_vocab(c, min_count=6) == ["b"]
    t = catlip.sparse_targets(["dogs dog", "", "geese and mice"], catlip.WorldLexicon(), ["circle"])
    assert t.shape == (3, 1) and (t == -1).all()


def test_transfer_rows_and_init(mini_wordnet):
    wn = mini_wordnet
    vocab = ["n600", "n300", "n100"]                          # mouse, dog, box
    rows = catlip.transfer_rows(["dog", "goose", "box", "photo"], vocab, wn)
    assert rows == [1, -1, 2, -1]                              # goose not in vocab, photo has no valid synset
    Wr, br = torch.randn(4, 3), torch.randn(4)
    Wc, bc = torch.randn(3, 3), torch.randn(3)
    W, b = catlip.init_head(Wr, br, Wc, bc, rows)
    assert torch.equal(W[0], Wc[1]) and torch.equal(W[2], Wc[2]) and b[0] == bc[1] and b[2] == bc[2]
    assert torch.equal(W[1], Wr[1]) and torch.equal(W[3], Wr[3]) and b[3] == br[3]   # fallback: random row
    assert catlip.transfer_rows(["circle", "moon"], ["moon"], catlip.WorldLexicon()) == [-1, 0]


KEYS = {"catlip_linear_probe_acc", "clip_linear_probe_acc", "catlip_knn_acc", "clip_knn_acc", "catlip_step_ms",
        "clip_step_ms", "transfer_init_acc", "random_init_acc", "vocab_size", "seconds", "device"}


def _losses(out, run):
    rows = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    return [r["loss"] for r in rows if r.get("run") == run]


def test_smoke_learns(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "catlip.py", "--smoke", f"--out={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=2400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert KEYS <= set(res), KEYS - set(res)
    assert set(res["transfer_init_acc"]) == set(res["random_init_acc"]) == {"1", "2", "5", "10"}
    # learned from the images: both training losses end below their chance level (CatLIP: the best image-blind
    # predictor of the synset frequencies, which is also its first loss; CLIP: uniform over the batch, ln B)
    assert res["catlip_final_loss"] < res["catlip_constant_loss"] - 0.1, res
    assert res["clip_final_loss"] < res["clip_chance_loss"] - 0.02, res
    assert abs(_losses(out, "catlip")[0] - res["catlip_constant_loss"]) < 1.5    # prior init of the head bias
    for k in ("catlip_linear_probe_acc", "clip_linear_probe_acc", "catlip_knn_acc", "clip_knn_acc"):
        assert 0.0 <= res[k] <= 1.0
    assert res["vocab_size"] == len(json.load(open(out / "vocab.json"))["entries"]) > 10
    for f in ("config.json", "catlip.safetensors", "clip.safetensors", "bench.png", "transfer_init.png"):
        assert (out / f).is_file(), f
    assert "expected effects" in r.stdout


def test_torchrun_on_exported_shards(tmp_path):
    from common.world import World, export_shards
    data = tmp_path / "shards"
    export_shards(World(seed=0, split="train", size=32, n=900), str(data), n=900, shard_size=150)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "catlip.py",
           "--smoke", f"--data={data}", f"--out={out}", "--n_train=600", "--n_val=150", "--n_test=150",
           "--probe_n=300", "--steps=8", "--shots=1,2", "--bench_batches=64", "--min_count=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=2400, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert KEYS <= set(res) and res["world_size"] == 2 and res["bench"]["world_size"] == 2
    assert res["samples_seen"] == 8 * json.load(open(out / "config.json"))["batch_size"]
    v = json.load(open(out / "vocab.json"))
    assert v["fingerprint"]["data"] == str(data) and v["entries"][0]["count"] >= v["entries"][-1]["count"]

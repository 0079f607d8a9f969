"""catlip.py: caption -> synset mining (hand-written WordNet fixture + real WordNet when present), vocabulary
counting and selection, Transfer Init row mapping, honest header/verdicts, the renamed flags, the EMA across a kill and
--resume, one --smoke run that must learn, and the smoke on exported shards as 1 process (bf16; then again in the same
--out: stages reused or retrained by their fingerprints) and as 2 gloo processes, checked from results.json."""
import json
import os
import socket
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import catlip  # noqa: E402
from common.data import SampleSource, open_source  # noqa: E402
from common.train import Dist  # noqa: E402

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
    assert set(wn.all_keys()) == {wn.key(w) for w in wn.first} - {None}   # the index space counts are summed in
    with pytest.raises(FileNotFoundError, match="index.noun"):
        catlip.WordNet(str(os.path.join(os.path.dirname(__file__), "no-such-dir")))


def test_caption_labels_real_wordnet(wordnet_dir):
    wn = catlip.WordNet(str(wordnet_dir))
    keys = catlip.caption_labels("Photos of two dogs, three geese and an image of crosses", wn)
    lemmas = [wn.lemma(k) for k in keys]
    assert "image" in lemmas and "dog" in lemmas and "goose" in lemmas and "cross" in lemmas
    assert "photograph" not in lemmas and "photo" not in lemmas
    assert wn.key("image") == "n5928118"           # corenet's key: the synset offset, unpadded
    assert "n5928118" in wn.all_keys()
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
    lex = catlip.WorldLexicon()
    assert catlip.synset_targets("two red circles", lex, {"circle": 0, "red": 1}, 3).tolist() == [1, 0, -1]
    assert catlip.synset_targets("dogs and mice", lex, {"circle": 0}, 2).tolist() == [-1, -1]


def test_count_synsets_and_caption_field():
    img = np.zeros((4, 4, 3), np.uint8)
    src = SampleSource([{"__key__": f"k{i}", "image": img, "caption": c, "label": 0}
                        for i, c in enumerate(["two circles", "a red circle and a star", "stock photo", ""])])
    counts, n, K = catlip.count_synsets(src, catlip.WorldLexicon(), "caption", Dist())
    assert counts == Counter({"circle": 2, "red": 1, "star": 1, "stock": 1, "photo": 1}) and n == 4 and K == 3
    # the field actually mined, and why, for the header: real image-text data has no alt_text
    assert catlip.caption_field(src, "alt_text") == ("caption", " (the data has no 'alt_text' field)")
    assert catlip.caption_field(src, "caption") == ("caption", "")
    with pytest.raises(ValueError, match="no caption"):
        catlip.caption_field(SampleSource([{"__key__": "k0", "image": img, "label": 3}]), "alt_text")
    p = catlip.Prepare(8, "caption", classes=2)
    assert p(src.samples[0])["image"].shape == (3, 8, 8)          # any input size -> image_size
    with pytest.raises(ValueError, match="need one in 0..1"):
        catlip.Prepare(8, "caption", classes=2)({**src.samples[0], "label": 5})


def _fake_results(**kw):
    r = {"catlip_linear_probe_acc": 0.5, "clip_linear_probe_acc": 0.48, "catlip_knn_acc": 0.4, "clip_knn_acc": 0.45,
         "catlip_step_ms": 1.0, "clip_step_ms": 2.0, "transfer_init_acc": {k: 0.2 for k in "1 2 5 10".split()},
         "random_init_acc": {k: 0.1 for k in "1 2 5 10".split()}, "transfer_classes_in_vocab": 0, "n_classes": 10,
         "chance": 0.1, "majority": 0.3, "bench_ratio_max_batch": float("nan"),
         "untrained_linear_probe_acc": 0.46}
    return {**r, **kw}


def test_report_verdicts(capsys):
    catlip.report(_fake_results())
    out = capsys.readouterr().out
    # no class in the vocabulary: both heads start from the same random rows, nothing is compared
    assert out.count("[n/a] Transfer Init") == 4 and "[n/a] contrastive/BCE" in out   # no bench: n/a
    assert "[yes] CatLIP linear probe within 3 pts of CLIP: 0.5 vs 0.48 (d +0.0500)" in out
    assert "[NO ] CatLIP k-NN > CLIP" in out and "[NO ] CatLIP k-NN within 3 pts" in out   # -0.05 + 0.03 < 0
    # representation bar: max(2 * 0.1, 0.3 + 0.15) = 0.45 -> CatLIP 0.5 passes, CLIP 0.48 passes
    assert "[yes] CatLIP probe >= max(2 chance, majority + .15): 0.5 vs 0.45" in out
    catlip.report(_fake_results(transfer_classes_in_vocab=10, clip_linear_probe_acc=0.44, bench_ratio_max_batch=0.5))
    out = capsys.readouterr().out
    assert out.count("[yes] Transfer Init") == 4 and "[NO ] CLIP probe >=" in out and "[NO ] contrastive/BCE" in out


def test_effects_keys_exist_in_results_layout():
    from common.seeds import summarize
    per = {0: _fake_results(bench_ratio_max_batch=2.0), 1: _fake_results(catlip_linear_probe_acc=0.52,
                                                                          bench_ratio_max_batch=3.0)}
    rows = {r["effect"]: r for r in summarize(per, catlip.EFFECTS)}
    assert len(rows) == len(catlip.EFFECTS) == 14
    r = rows["CatLIP linear probe within 3 pts of CLIP"]
    assert r["d_values"] == pytest.approx([0.05, 0.07]) and r["verdict"] == "shown"
    assert rows["CatLIP k-NN > CLIP"]["verdict"] == "not shown"
    assert rows["CatLIP fwd+bwd step cheaper than CLIP (same batch)"]["d_values"] == [1.0, 1.0]


def test_probe_tasks_and_colour_label():
    img = np.zeros((4, 4, 3), np.uint8)
    with_fine = SampleSource([{"__key__": "k0", "image": img, "caption": "a", "label": 2, "label_fine": 23}])
    plain = SampleSource([{"__key__": "k0", "image": img, "caption": "a", "label": 2}])
    cfg = catlip.Config()
    assert catlip.probe_tasks(cfg, with_fine) == ["shape", "color"]
    assert catlip.probe_tasks(cfg, plain) == ["shape"]               # no label_fine: the colour is dropped
    for bad in ("shape,size", "", "shape,shape"):
        with pytest.raises(ValueError, match="--probe_tasks"):
            catlip.probe_tasks(catlip.Config(probe_tasks=bad), with_fine)
    out = catlip.Prepare(8, "caption", classes=10, color=True)(with_fine.samples[0])
    assert out["label"] == 2 and out["color"] == 23 % len(catlip.COLORS) == 5   # label_fine = shape * 9 + colour
    with pytest.raises(ValueError, match="label_fine"):
        catlip.Prepare(8, "caption", classes=10, color=True)(plain.samples[0])


def test_probe_all_means_chance_and_majority():
    g = torch.Generator().manual_seed(0)
    y = {"shape": torch.tensor([0, 0, 0, 1] * 25), "color": torch.tensor([0, 1, 2, 2] * 25)}
    f = torch.randn(100, 6, generator=g)
    f[:, 0] += 10 * y["shape"]           # the shape is linearly decodable with a wide margin
    feats = {"m": (f, f, f)}
    p = catlip.probe_all(catlip.Config(knn_k=3), feats, y, y, y, {"shape": 2, "color": 3})
    assert p["probe_tasks"] == ["shape", "color"]
    assert p["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert p["majority"] == pytest.approx((0.75 + 0.5) / 2)        # most frequent test label per task
    assert p["m_linear_probe_acc"] == pytest.approx(np.mean([p["probe"][t]["m_linear_probe_acc"] for t in y]))
    assert p["probe"]["shape"]["m_linear_probe_acc"] == 1.0


def test_few_shot_lr_chosen_on_val_never_test():
    """Features where the CatLIP rows already classify perfectly: Transfer Init must beat the random head at 1
    shot, and shuffling the TEST labels must not change the lr either init picks (the val split chooses)."""
    g = torch.Generator().manual_seed(0)
    C, D, n = 4, 8, 400
    centers = 0.8 * torch.randn(C, D, generator=g)   # overlapping classes: one shot is not enough from scratch
    def data(m):
        y = torch.arange(m) % C
        return centers[y] + torch.randn(m, D, generator=g), y
    fp, yp = data(n)
    ft, yt = data(200)
    head = torch.nn.Linear(D, C)
    with torch.no_grad():
        head.weight.copy_(centers)
        head.bias.copy_(-0.5 * (centers ** 2).sum(1))
    cfg = catlip.Config(shots="1,2", fewshot_draws=2, fewshot_steps=20, fewshot_lrs="1e-4,1e-2,1e-1")
    out = catlip.few_shot(cfg, fp, yp, ft, yt, head, list(range(C)))
    shuffled = catlip.few_shot(cfg, fp, yp, ft, yt[torch.randperm(200, generator=g)], head, list(range(C)))
    assert out["lr"] == shuffled["lr"] and out["val"] == shuffled["val"]
    assert out["transfer_zero_shot"] > 0.7 and out["transfer"]["1"] > out["random"]["1"] + 0.1
    assert set(out["val"]["random"]["1"]) and len(out["val"]["random"]["1"]) == 3     # one val acc per lr
    with pytest.raises(ValueError, match="--fewshot_lrs"):
        catlip.few_shot(catlip.Config(fewshot_lrs="0.1,-1"), fp, yp, ft, yt, head, list(range(C)))


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


@pytest.mark.parametrize("old,new", [("size", "image_size"), ("patch", "patch_size"), ("text", "caption")])
def test_old_flag_spellings_name_the_new_ones(old, new):
    with pytest.raises(SystemExit, match=f"--{old} is now --{new}"):
        catlip.main([f"--{old}=1"])


class Killed(Exception):
    pass


def _toy_stage(out, kill_at=None, resume=False):
    """A 6-step EMA stage of a linear toy model through catlip.run_stage (checkpoints every 2 steps); the data
    raises at step kill_at, as a kill would."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    ema = catlip.EMA(model, 0.3)
    cfg = catlip.Config(out=str(out), steps=6, ckpt_every=2, log_every=0, warmup=0, lr=0.1, resume=resume)

    def data(i):
        if i == kill_at:
            raise Killed
        return torch.randn(8, 4, generator=torch.Generator().manual_seed(i))

    hist = catlip.run_stage(cfg, Dist(), "toy", model, lambda m, x: (m(x) - 1).pow(2).mean(), data, {"toy": 1}, ema)
    return ema, hist


def test_ema_follows_its_checkpoint_on_resume_and_reuse(tmp_path):
    straight, _ = _toy_stage(tmp_path / "a")
    with pytest.raises(Killed):
        _toy_stage(tmp_path / "b", kill_at=3)          # steps 1-3 done, the last checkpoint (and EMA file) at 2
    resumed, hist = _toy_stage(tmp_path / "b", resume=True)
    assert hist["start"] == 2 and resumed.step == 6
    assert torch.equal(resumed.model.weight, straight.model.weight) and torch.equal(resumed.model.bias,
                                                                                    straight.model.bias)
    reused, hist = _toy_stage(tmp_path / "b")           # finished: reused with the EMA saved at its last step
    assert hist["reused"] and reused.step == 6 and torch.equal(reused.model.weight, straight.model.weight)


KEYS = {"catlip_linear_probe_acc", "clip_linear_probe_acc", "catlip_knn_acc", "clip_knn_acc", "catlip_step_ms",
        "clip_step_ms", "transfer_init_acc", "random_init_acc", "vocab_size", "seconds", "device", "chance",
        "majority", "untrained_linear_probe_acc", "probe", "fewshot_lr", "bench_ratio_max_batch"}


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
    assert res["probe_tasks"] == ["shape", "color"] and res["chance"] == pytest.approx((1 / 10 + 1 / 9) / 2)
    grid = [float(x) for x in catlip.Config.fewshot_lrs.split(",")]
    assert all(res["fewshot_lr"][a][k] in grid for a in ("random", "transfer") for k in res["transfer_init_acc"])
    # each init's reported lr is the best of its val accuracies (the val split chooses, per init and shot count)
    for a in ("random", "transfer"):
        for k, v in res["fewshot_val_acc"][a].items():
            assert grid[int(np.argmax(v))] == res["fewshot_lr"][a][k]
    # learned from the images: both training losses end below their chance level (CatLIP: the best image-blind
    # predictor of the synset frequencies, which is also its first loss; CLIP: uniform over the batch, ln B)
    assert res["catlip_final_loss"] < res["catlip_constant_loss"] - 0.1, res
    assert res["clip_final_loss"] < res["clip_chance_loss"] - 0.02, res
    assert abs(_losses(out, "catlip")[0] - res["catlip_constant_loss"]) < 1.5    # prior init of the head bias
    assert res["vocab_size"] == len(json.load(open(out / "vocab.json"))["entries"]) > 10
    for f in ("config.json", "catlip.safetensors", "clip.safetensors", "bench.png", "transfer_init.png"):
        assert (out / f).is_file(), f
    assert "expected effects" in r.stdout
    d, B = res["data"], res["samples_seen"]
    # CatLIP and CLIP stream the same samples: twice the samples seen, once the keys (1600 world images, 1.6 epochs)
    assert d["train_samples_seen"] == 2 * B and d["train_unique_keys"] == 1600 and d["eval_keys_in_train"] == 0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """500 exported world samples in one stream of 5 shards (--holdout splits it by key hash), and the vocabulary
    counts of its training split, counted here in one process."""
    from common.world import World, export_shards
    data = tmp_path_factory.mktemp("catlip") / "shards"
    export_shards(World(seed=0, split="train", size=32, n=500), str(data), n=500, shard_size=100)
    counts, n, _ = catlip.count_synsets(open_source(str(data), "train", holdout=0.1), catlip.WorldLexicon(),
                                        "alt_text", Dist())
    return data, counts, n


@pytest.mark.parametrize("procs", [1, 2])
def test_smoke_on_exported_shards(shards, tmp_path, procs):
    data, counts, n_train = shards
    out = tmp_path / "run"
    args = ["catlip.py", "--smoke", f"--data={data}", "--holdout=0.1", f"--out={out}", "--steps=4", "--batch_size=32",
            "--n_val=40", "--n_test=30", "--probe_n=200", "--shots=1,2", "--min_count=2"]
    env = dict(os.environ)
    if procs == 1:   # 1 process: the CUDA dtype path (bf16 autocast) on CPU
        cmd = [sys.executable] + args + ["--amp=bf16", "--bench=false"]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"] + args \
            + ["--bench_batches=64"]
        env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert "reusing" not in r.stdout
    assert KEYS <= set(res) and res["world_size"] == procs and res["captions"] == "alt_text"
    assert "captions: alt_text;" in r.stdout
    d = res["data"]
    assert d["eval_keys_in_train"] == 0 and d["train_keys_on_several_ranks"] == 0 and d["skipped_corrupt"] == 0
    assert d["eval_samples"] == 70 and d["train_samples_seen"] == 2 * 4 * 32      # CatLIP's stream + CLIP's
    assert d["train_unique_keys"] == 4 * 32             # ... over the same samples, none of them twice per method
    # the vocabulary counts only the training split, and the ranks' counts sum to the one-process count
    v = json.load(open(out / "vocab.json"))
    assert v["n_captions"] == n_train < 500
    assert {e["key"]: e["count"] for e in v["entries"]} == {k: c for k, c in counts.items() if c >= 2}
    if procs == 2:
        assert res["bench"]["world_size"] == 2
        return
    # the same --out again with a smaller vocabulary: vocab and CatLIP (trained on it) are redone, CLIP is reused
    r = subprocess.run(cmd + ["--top_k=5"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    again = json.load(open(out / "results.json"))
    assert "vocab: reusing" not in r.stdout and again["vocab_size"] == 5 < res["vocab_size"]
    assert "catlip: reusing" not in r.stdout and "catlip.safetensors was trained with another configuration" in r.stdout
    assert "clip: reusing" in r.stdout and again["clip_knn_acc"] == res["clip_knn_acc"]

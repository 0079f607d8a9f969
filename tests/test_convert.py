"""python -m common.convert: torch.save pickles (read with weights_only=True) -> safetensors; refusals of files that
need code to unpickle, truncated and foreign files; nested checkpoints, prefixes, shared storage, atomic writes."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from common.convert import CheckpointError, convert, main, read_safetensors


class Payload:
    """A class a pickle refers to by name: unpickling it would import and run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):          # unpickling would call Path.touch(marker): creates a file if it were executed
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class TrainConfig:
    """A plain custom class, as training scripts often store their config in a checkpoint."""

    def __init__(self):
        self.lr = 0.1


def _ls(d):
    return sorted(p.name for p in d.iterdir())


def test_nested_checkpoint_prefix_and_report(tmp_path):
    w, b, e = torch.randn(4, 3), torch.randn(4), torch.arange(6)
    ckpt = {"epoch": 7, "name": "run-1", "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
            "state_dict": {"module.visual.proj": w, "module.head": {"weight": w * 2, "bias": b},
                           "module.steps": e, "module.config": {"width": 64, "act": "gelu"}}}
    torch.save(ckpt, tmp_path / "run.pt")
    rep = convert(tmp_path / "run.pt", tmp_path / "out" / "run.safetensors")
    sd, meta = read_safetensors(tmp_path / "out" / "run.safetensors")
    assert set(sd) == {"visual.proj", "head.weight", "head.bias", "steps"}
    assert torch.equal(sd["visual.proj"], w) and torch.equal(sd["head.weight"], w * 2) and torch.equal(sd["steps"], e)
    assert rep["path"] == "state_dict" and rep["stripped"] == ["module."]
    assert sorted(rep["skipped"]) == ["config.act (str)", "config.width (int)"]
    assert sorted(rep["ignored"]) == ["epoch", "name", "optimizer"]
    assert (rep["tensors"], rep["params"]) == (4, 12 + 12 + 4 + 6)
    assert meta == {"format": "pt", "converted_from": "run.pt"}
    assert _ls(tmp_path / "out") == ["run.safetensors"]              # no temporary file left behind


def test_container_choice_and_key(tmp_path):
    a, ema = {"_orig_mod.module.w": torch.ones(2)}, {"w": torch.full((2,), 3.0)}
    torch.save({"model": a, "ema": ema, "step": 10}, tmp_path / "c.pt")
    rep = convert(tmp_path / "c.pt", tmp_path / "model.safetensors")   # trained weights before their EMA copy
    assert rep["path"] == "model" and rep["stripped"] == ["_orig_mod.", "module."]
    assert torch.equal(read_safetensors(tmp_path / "model.safetensors")[0]["w"], torch.ones(2))
    convert(tmp_path / "c.pt", tmp_path / "ema.safetensors", key="ema")
    assert torch.equal(read_safetensors(tmp_path / "ema.safetensors")[0]["w"], torch.full((2,), 3.0))
    with pytest.raises(CheckpointError, match=r"c\.pt: --key=teacher: no entry 'teacher' at top level"):
        convert(tmp_path / "c.pt", tmp_path / "x.safetensors", key="teacher")
    torch.save({"wrapper": {"model": {"ema": {"module": {"k": torch.zeros(1)}}}}}, tmp_path / "deep.pt")
    rep = convert(tmp_path / "deep.pt", tmp_path / "deep.safetensors", key="wrapper")   # --key is taken as is
    assert rep["path"] == "wrapper"
    assert set(read_safetensors(tmp_path / "deep.safetensors")[0]) == {"model.ema.module.k"}
    torch.save({"model": {"ema": {"module": {"k": torch.zeros(1)}}}}, tmp_path / "auto.pt")
    assert convert(tmp_path / "auto.pt", tmp_path / "auto.safetensors")["path"] == "model.ema.module"


def test_shared_storage_views_dtypes_and_legacy_format(tmp_path):
    buf = torch.arange(12.0)
    tied = torch.randn(5, 3)
    sd = {"q": buf[:4], "k": buf[4:8], "v": buf[8:].view(2, 2), "emb": tied, "head": tied, "t": tied.T,
          "half": torch.randn(3).half(), "bf": torch.randn(2).bfloat16(), "mask": torch.tensor([True, False]),
          "idx": torch.tensor([1, 2], dtype=torch.int64), "empty": torch.zeros(0, 4)}
    torch.save(sd, tmp_path / "tied.pt")
    rep = convert(tmp_path / "tied.pt", tmp_path / "tied.safetensors")
    out, _ = read_safetensors(tmp_path / "tied.safetensors")
    assert set(out) == set(sd) and rep["cloned"] >= 5            # k, v, head, t and q (a view of a bigger buffer)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    out["emb"] += 1                                               # separate storages after loading
    assert not torch.equal(out["emb"], out["head"])
    torch.save({"state_dict": {"w": torch.ones(3)}}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    convert(tmp_path / "old.pt", tmp_path / "old.safetensors")
    assert torch.equal(read_safetensors(tmp_path / "old.safetensors")[0]["w"], torch.ones(3))


def test_refuses_pickles_that_need_code(tmp_path):
    marker = tmp_path / "EXECUTED"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as e:
        convert(tmp_path / "evil.pt", tmp_path / "evil.safetensors")
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "evil.pt")) and "needs code to unpickle" in msg and "\n" not in msg
    assert "(it references " in msg and "nothing from it was executed" in msg
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()
    torch.save({"w": torch.ones(1), "cfg": TrainConfig()}, tmp_path / "cls.pt")
    # a plain custom class instance is refused too, and the global is named
    with pytest.raises(CheckpointError, match=r"cls\.pt: needs code to unpickle \(it references [\w.]*TrainConfig"):
        convert(tmp_path / "cls.pt", tmp_path / "cls.safetensors")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")     # torch.jit.script / save are deprecated
def test_refuses_bad_files(tmp_path):
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "ok.pt")
    raw = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    torch.save([torch.ones(3)], tmp_path / "list.pt")
    torch.save({"epoch": 1, "name": "x"}, tmp_path / "notensors.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "scripted.pt"))
    convert(tmp_path / "ok.pt", tmp_path / "ok.safetensors")
    cases = {"missing.pt": r"missing\.pt: no such file", "cut.pt": r"cut\.pt: truncated or corrupt torch\.save",
             "notes.pt": r"notes\.pt: not a torch\.save file", "empty.pt": r"empty\.pt: empty file",
             "tensor.pt": r"tensor\.pt: holds a single tensor", "list.pt": r"list\.pt: holds a list",
             "notensors.pt": r"notensors\.pt: no tensors found", "scripted.pt": r"scripted\.pt: is a TorchScript",
             "ok.safetensors": r"ok\.safetensors: a safetensors file \(nothing to convert\)"}
    for name, pattern in cases.items():
        with pytest.raises(CheckpointError, match=pattern) as e:
            convert(tmp_path / name, tmp_path / "x.safetensors")
        assert "\n" not in str(e.value), name
    assert not (tmp_path / "x.safetensors").exists()


def test_atomic_write_keeps_old_output_on_failure(tmp_path, monkeypatch):
    torch.save({"w": torch.ones(4)}, tmp_path / "a.pt")
    convert(tmp_path / "a.pt", tmp_path / "a.safetensors")
    before = (tmp_path / "a.safetensors").read_bytes()
    import safetensors.torch as st

    def crash(tensors, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(st, "save_file", crash)
    torch.save({"w": torch.zeros(4)}, tmp_path / "a.pt")
    with pytest.raises(OSError, match="disk full"):
        convert(tmp_path / "a.pt", tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == before   # the old file is intact
    assert _ls(tmp_path) == ["a.pt", "a.safetensors"]              # and the partial temporary file is gone


def test_cli_exit_codes_and_messages(tmp_path, capsys):
    torch.save({"state_dict": {"w": torch.ones(2, 2)}, "step": 3}, tmp_path / "m.pt")
    assert main([str(tmp_path / "m.pt"), str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "1 tensors, 4 values from 'state_dict'" in out and "ignored beside the state dict: step" in out
    (tmp_path / "bad.pt").write_text("hello")
    assert main([str(tmp_path / "bad.pt"), str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "bad.pt" in err
    with pytest.raises(CheckpointError):
        main([str(tmp_path / "bad.pt"), str(tmp_path / "bad.safetensors"), "--debug"])
    # as a real command: status 2 and one line, no traceback
    r = subprocess.run([sys.executable, "-m", "common.convert", str(tmp_path / "nope.pt"), str(tmp_path / "o.st")],
                       capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parents[1],
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "nope.pt: no such file" in r.stderr
    assert "Traceback" not in r.stderr

"""common.config: --key=value parsing, --help, errors, atomic save_json, print_table."""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pytest
import torch

from common.config import config_to_dict, format_help, parse_config, print_table, save_json


@dataclass
class Cfg:
    """Demo config for the tests."""
    steps: int = 300  # optimizer steps
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    # image side in pixels
    image_size: int = 32
    smoke: bool = False  # tiny sizes, < 60 s
    out: str = "runs/x"  # folder with a "#" inside the default's comment
    betas: tuple[float, float] = (0.9, 0.98)
    years: Optional[list[int]] = None
    amp: Literal["bf16", "none", "auto"] = "auto"
    note: str = "a#b"


def test_defaults_and_overrides():
    assert parse_config(Cfg, []) == Cfg()
    c = parse_config(Cfg, ["--steps=1e3", "--lr", "3e-4", "--smoke", "--betas=0.9,0.95", "--years=[2014, 2015]",
                           "--amp=bf16", "--image-size=48", "--out=a b"])
    assert (c.steps, c.lr, c.smoke, c.betas, c.years, c.amp, c.image_size, c.out) == \
           (1000, 3e-4, True, (0.9, 0.95), [2014, 2015], "bf16", 48, "a b")
    assert parse_config(Cfg, ["--smoke=false"]).smoke is False
    assert parse_config(Cfg, ["--smoke", "true", "--steps", "5"]).steps == 5
    assert parse_config(Cfg, ["--no_smoke"]).smoke is False
    assert parse_config(Cfg, ["--years=2014,2016"]).years == [2014, 2016]
    assert parse_config(Cfg, ["--years=none"]).years is None
    assert parse_config(Cfg, ["--betas=(0.5, 0.6)"]).betas == (0.5, 0.6)


def test_presets_fill_only_keys_not_given():
    pre = {"smoke": {"steps": 5, "image_size": 16}}
    c = parse_config(Cfg, ["--smoke", "--steps=7"], presets=pre)
    assert (c.steps, c.image_size) == (7, 16)
    assert parse_config(Cfg, ["--steps=7"], presets=pre).image_size == 32  # flag off: no preset
    with pytest.raises(ValueError, match="bogus"):
        parse_config(Cfg, [], presets={"smoke": {"bogus": 1}})


def test_commands():
    c = parse_config(Cfg, ["reinforce", "--steps=2"], commands=["reinforce", "train"])
    assert c._command == "reinforce" and c.steps == 2
    assert parse_config(Cfg, ["--steps=2"], commands=["reinforce"])._command is None
    with pytest.raises(SystemExit, match="unknown command 'bogus'"):
        parse_config(Cfg, ["bogus"], commands=["reinforce"])
    with pytest.raises(SystemExit, match="unexpected argument 'bogus'"):
        parse_config(Cfg, ["bogus"])


@pytest.mark.parametrize("argv,pattern", [
    (["--step=3"], r"unknown config key --step \(did you mean --steps\?\).*valid keys: steps, lr, image_size"),
    (["--lr=abc"], r"--lr: 'abc' is not a valid float"),
    (["--steps=1.5"], r"--steps: '1.5' is not a valid int"),
    (["--smoke=maybe"], r"--smoke: 'maybe' is not a valid bool"),
    (["--betas=1"], r"--betas: '1' is not a valid tuple\[float, float\]"),
    (["--amp=fp8"], r"--amp: 'fp8'.*choose from bf16, none, auto"),
    (["--years=[1,x]"], r"--years"),
    (["--steps"], r"--steps needs a value of type int"),
])
def test_errors_name_key_value_and_type(argv, pattern):
    with pytest.raises(SystemExit, match=pattern):
        parse_config(Cfg, argv)


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Demo config for the tests." in out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip().startswith("--")}
    assert set(lines) == {f"--{k}" for k in config_to_dict(Cfg())}
    assert "int" in lines["--steps"] and "300" in lines["--steps"] and "optimizer steps" in lines["--steps"]
    assert "peak learning rate" in lines["--lr"]  # from field metadata
    assert "image side in pixels" in lines["--image_size"]  # from the comment line above the field
    assert 'folder with a "#" inside' in lines["--out"]  # tokenizer-based: '#' in strings is not a comment
    assert lines["--note"].rstrip().endswith("'a#b'")
    assert "Optional[list[int]]" in lines["--years"]
    assert format_help(Cfg, commands=["a", "b"]).splitlines()[0].endswith("[a|b] [--key=value ...]")


def test_save_json_atomic_and_types(tmp_path):
    p = tmp_path / "sub" / "r.json"
    obj = {"cfg": Cfg(), "a": np.float32(0.5), "b": np.arange(3), "t": torch.tensor([1.5, 2.0]),
           "s": torch.tensor(3), "p": Path("x/y"), "tup": (1, 2), "i": np.int64(7)}
    save_json(p, obj)
    d = json.loads(p.read_text())
    assert d["cfg"]["betas"] == [0.9, 0.98] and d["a"] == 0.5 and d["b"] == [0, 1, 2]
    assert d["t"] == [1.5, 2.0] and d["s"] == 3 and d["p"] == "x/y" and d["i"] == 7
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(TypeError, match="cannot serialise"):
        save_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()


def test_print_table(capsys):
    s = print_table({"zeroshot_acc": 0.81234, "retrieval": {"i2t_r1": 0.5, "t2i_r1": 1e-5}, "device": "cpu",
                     "steps": 300}, title="results")
    assert capsys.readouterr().out.strip() == s.strip()
    lines = s.splitlines()
    assert lines[0] == "results"
    assert any(ln.startswith("retrieval.i2t_r1") and ln.endswith("0.5000") for ln in lines)
    assert any(ln.startswith("zeroshot_acc") and ln.endswith("0.8123") for ln in lines)
    assert any(ln.endswith("1e-05") for ln in lines)
    body = [ln for ln in lines if "|" in ln]
    assert len({ln.index("|") for ln in body}) == 1 and len({len(ln) for ln in body}) == 1  # aligned

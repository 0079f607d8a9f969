"""common.config: --key=value parsing, --help, errors, atomic save_json, print_table, run_cli's one-line errors."""
import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pytest
import torch

from common.config import config_to_dict, format_help, parse_config, print_table, save_json

ROOT = Path(__file__).resolve().parents[1]


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
    years: list[int] = field(default_factory=list)
    amp: str = "auto"
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
    assert parse_config(Cfg, ["--years="]).years == []
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
    (["--years=[1,x]"], r"--years"),
    (["--steps"], r"--steps needs a value of type int"),
])
def test_errors_name_key_value_and_type(argv, pattern):
    with pytest.raises(SystemExit, match=pattern):
        parse_config(Cfg, argv)


@pytest.mark.parametrize("tp", [Optional[int], Literal["a", "b"], Path, set[int], tuple[Path, ...]])
def test_unsupported_field_types_are_a_type_error(tp):
    # no config in the repository uses these; a field that does fails at once, naming itself, not at its first use
    C = dataclasses.make_dataclass("C", [("x", tp, None)])
    with pytest.raises(TypeError, match=r"C\.x has type .*supported: bool, int, float, str"):
        parse_config(C, [])


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
    assert "list[int]" in lines["--years"] and "tuple[float, float]" in lines["--betas"]
    assert "--debug" in out   # run_cli's flag, named in the header
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


# ----------------------------------------------------------------------------------------------------------------------
# run_cli: one line per bad-input error at the command-line boundary, tracebacks for bugs and with --debug

CLI_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from dataclasses import dataclass
from common.config import parse_config, run_cli


@dataclass
class Config:
    steps: int = 1


def main():
    case = sys.argv[1]
    assert "--debug" not in sys.argv, "run_cli strips --debug before main"
    if case == "shards":
        raise FileNotFoundError("shard pattern 'x-{{000..009}}.tar': 10 path(s) do not exist: x-000.tar, ...")
    if case == "open":
        open(sys.argv[2])
    if case == "safetensors":
        from safetensors import safe_open
        safe_open(sys.argv[2], "np")
    if case == "key":
        raise KeyError("ckpt.safetensors: no tensor 'head.weight'; expected the keys of a CatLIP checkpoint")
    if case == "runtime":
        raise RuntimeError(f"cannot read checkpoint {{sys.argv[2]}}: "
                           "truncated or not a safetensors file?")
    if case == "value-in-library":
        int("x")             # a ValueError raised by Python, not by a raise statement here: maybe a bug
    if case == "torch-shape":
        import torch
        torch.ones(2, 3) @ torch.ones(2, 3)     # torch's RuntimeError: a bug, keeps its traceback
    if case == "type":
        len(5)
    if case == "worker":     # torch re-raises it in the main process with the worker's traceback in the message
        import torch.utils.data as tud

        class Shards(tud.Dataset):
            def __len__(self):
                return 1

            def __getitem__(self, i):
                raise FileNotFoundError("shard 'x-000.tar' vanished")
        next(iter(tud.DataLoader(Shards(), num_workers=1)))
    if case == "interrupt":
        raise KeyboardInterrupt
    if case == "config":
        parse_config(Config, sys.argv[2:])
    if case == "exit3":
        raise SystemExit(3)
    print("ran", sys.argv[1:])


if __name__ == "__main__":
    run_cli(main)
"""


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    script = d / "entry.py"
    script.write_text(CLI_SCRIPT.format(root=str(ROOT)))
    (d / "bad.safetensors").write_bytes(b"\x08" + bytes(7) + b'{"a": 1}')   # header length 8, not a valid header

    def run(*args):
        r = subprocess.run([sys.executable, str(script), *args], cwd=d, capture_output=True, text=True, timeout=120)
        return r.returncode, r.stderr.splitlines()
    run.dir = d
    return run


@pytest.mark.parametrize("args,needle", [
    (["shards"], "error: shard pattern 'x-{000..009}.tar': 10 path(s) do not exist"),
    (["open", "no/such/file.json"], "No such file or directory: 'no/such/file.json'"),
    (["safetensors", "bad.safetensors"], "error: safetensors: Error while deserializing header"),
    (["key"], "error: ckpt.safetensors: no tensor 'head.weight'; expected"),   # no repr quotes around it
    (["runtime", "c.safetensors"], "error: cannot read checkpoint c.safetensors: truncated or not a safetensors"),
    (["worker"], "error: FileNotFoundError: shard 'x-000.tar' vanished"),
])
def test_run_cli_bad_input_is_one_line(cli, args, needle):
    rc, err = cli(*args)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_run_cli_debug_shows_the_traceback(cli):
    rc, err = cli("--debug", "shards")   # anywhere on the command line; main() never sees it
    assert rc == 1 and err[0] == "Traceback (most recent call last):" and err[-1].startswith("FileNotFoundError: ")
    rc, err = cli("--debug", "runtime", "c.safetensors")
    assert rc == 1 and err[0].startswith("Traceback") and err[-1].startswith("RuntimeError: cannot read checkpoint")


@pytest.mark.parametrize("case,last", [
    ("type", "TypeError: object of type 'int' has no len()"),
    ("value-in-library", "ValueError: invalid literal for int() with base 10: 'x'"),
    ("torch-shape", "RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x3 and 2x3)"),
])
def test_run_cli_bugs_keep_their_traceback(cli, case, last):
    rc, err = cli(case)
    assert rc == 1 and err[0] == "Traceback (most recent call last):" and err[-1] == last, err


def test_run_cli_interrupt_exit_and_config_errors(cli):
    assert cli("interrupt") == (130, ["error: interrupted"])
    assert cli("exit3") == (3, [])                                    # SystemExit passes through unchanged
    rc, err = cli("config", "--stesp=2")                              # parse_config's own one-line SystemExit
    assert rc == 1 and len(err) == 1 and "unknown config key --stesp (did you mean --steps?)" in err[0]
    r = subprocess.run([sys.executable, str(cli.dir / "entry.py"), "ok", "--debug", "x"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ran ['ok', 'x']"   # --debug removed, the rest kept in order


def test_old_spellings_name_the_new_key():
    from dataclasses import dataclass

    from common.config import parse_config

    @dataclass
    class C:
        image_size: int = 32
        context_length: int = 77
        retrain: bool = False

    for old, new in (("--size=64", "--image_size"), ("--context=16", "--context_length"),
                     ("--reuse=false", "--retrain")):
        with pytest.raises(SystemExit, match=f"is now {new}"):
            parse_config(C, [old])
    assert parse_config(C, ["--image_size=64"]).image_size == 64

"""Config CLI: one dataclass per script, overridden from the command line as `--key=value`.

nanoGPT's configurator idea (globals + `--key=value` + literal_eval), but typed through a dataclass so that
`--help` can list every field with its type, default and one-line meaning, and bad input fails loudly:

    @dataclass
    class Config:
        steps: int = 300          # optimizer steps
        lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    cfg = parse_config(Config)    # python x.py --steps=100 --lr 3e-4 --smoke

Field types: bool, int, float, str, and tuple/list of those (`betas: tuple[float, float]`, `lrs: tuple[float, ...]`);
parse_config raises TypeError naming any other field type (an empty string or 0 serves where None would).

Every entry point ends with `if __name__ == "__main__": run_cli(main)`: bad input (a missing shard pattern, a truncated
checkpoint) then ends the run with one line `error: <message>` and exit status 2 instead of a 25-line traceback;
`--debug` on the command line shows the traceback.

Also: `save_json` (atomic, numpy/torch/dataclass aware) and `print_table` (aligned table of nested results).
"""
import ast
import dataclasses
import difflib
import inspect
import io
import json
import linecache
import math
import os
import sys
import tokenize
import typing
from pathlib import Path

_TRUE = {"1", "true", "yes", "y", "on", "t"}
_FALSE = {"0", "false", "no", "n", "off", "f"}


def _type_name(tp):
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(s, tp, key):
    """Parse the command-line string `s` into type `tp`; SystemExit naming key, value and type on failure."""
    def bad(why=""):
        raise SystemExit(f"config error: bad value for --{key}: {s!r} is not a valid {_type_name(tp)}{why}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:  # the items of a bare tuple / list
        try:
            return ast.literal_eval(s)
        except (ValueError, SyntaxError):
            return s
    if origin in (tuple, list) or tp in (tuple, list):
        t = s.strip()
        if t.startswith(("(", "[", "{")):   # a Python literal; else comma-separated (--lrs= gives ())
            try:
                items = list(ast.literal_eval(t))
            except (ValueError, SyntaxError, TypeError):
                bad()
        else:
            items = [x.strip() for x in t.split(",") if x.strip()] if t else []
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                bad(f" (expected {len(args)} comma-separated values)")
            types = list(args)
        else:
            types = [args[0] if args else typing.Any] * len(items)
        out = [_convert(x if isinstance(x, str) else repr(x), t, key) for x, t in zip(items, types)]
        return (origin or tp)(out)
    if tp is bool:
        v = s.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        bad(" (use true/false)")
    if tp is int:
        try:
            return int(s.replace("_", ""))
        except ValueError:
            try:  # allow 1e4 for step counts, but only when it is integral
                f = float(s)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
            bad()
    if tp is float:
        try:
            return float(s)
        except ValueError:
            bad()
    return s  # str: parse_config admits no other type


def _supported(tp):
    """The field types _convert parses: bool, int, float, str, and tuple/list of them (or bare tuple / list)."""
    scalars = (bool, int, float, str)
    if tp in scalars or tp in (tuple, list):
        return True
    return typing.get_origin(tp) in (tuple, list) and all(a in scalars or a is Ellipsis for a in typing.get_args(tp))


def _comment_help(cls):
    """Field name -> trailing `# comment` (or a comment line right above the field) in the class source."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    src = inspect.cleandoc("\n" + src) if src.startswith((" ", "\t")) else src
    comments = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    except (tokenize.TokenError, IndentationError):
        return {}
    lines = src.splitlines()
    out = {}
    try:
        body = ast.parse(src).body[0].body
    except (SyntaxError, IndexError, AttributeError):
        return {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            end = node.end_lineno
            if end in comments:
                out[node.target.id] = comments[end][1]
            elif node.lineno - 1 in comments and lines[node.lineno - 2].strip().startswith("#"):
                out[node.target.id] = comments[node.lineno - 1][1]
    return out


def _fields(cls):
    hints = typing.get_type_hints(cls)
    return [(f, hints.get(f.name, typing.Any)) for f in dataclasses.fields(cls) if f.init]


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def format_help(cls, commands=None, prog=None):
    """The --help text: one line per field with name, type, default and meaning."""
    prog = prog or os.path.basename(sys.argv[0] or "script")
    helps = _comment_help(cls)
    rows = []
    for f, tp in _fields(cls):
        d = _default(f)
        rows.append((f"--{f.name}", _type_name(tp), "(required)" if d is dataclasses.MISSING else repr(d),
                     f.metadata.get("help") or helps.get(f.name, "")))
    head = f"usage: {prog}" + (" [" + "|".join(commands) + "]" if commands else "") + " [--key=value ...]"
    doc = (inspect.getdoc(cls) or "").strip()
    if doc.startswith(cls.__name__ + "("):  # dataclass auto-docstring says nothing
        doc = ""
    out = [head]
    if doc:
        out += ["", doc.splitlines()[0]]
    if commands:
        out += ["", "commands: " + ", ".join(commands)]
    out += ["", "options (bools: --flag, --flag=false; --debug: a traceback instead of a one-line error):"]
    w = [max(len(r[i]) for r in rows) if rows else 0 for i in range(3)]
    for r in rows:
        out.append(f"  {r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip())
    return "\n".join(out)


# Old spellings of a concept -> (the one name every script now uses, how to translate).
RENAMED = {"size": ("image_size", ""), "patch": ("patch_size", ""), "context": ("context_length", ""),
           "text": ("caption", ""), "batch": ("batch_size", ""), "clip_patch": ("clip_patch_size", ""),
           "reuse": ("retrain", ": --reuse=false is --retrain (finished stages with the same config are reused)")}


def parse_config(cls, argv=None, commands=None, presets=None):
    """Build `cls` (a dataclass) from `--key=value` / `--key value` / `--flag` arguments.

    argv: list of strings (default sys.argv[1:]). commands: optional list of sub-command words; a leading positional
    word must be one of them and is stored as `cfg._command` (None when absent). `-h/--help` prints every field and
    exits 0. Unknown keys and unparsable values raise SystemExit with a message naming the key and listing valid keys.
    Dashes in keys are accepted for underscores (`--batch-size`), and `--no_flag` sets a bool field to False.
    presets: {bool_field: {key: value}} applied when that flag ends up True, to keys NOT given on the command line,
    e.g. presets={"smoke": dict(steps=60, batch_size=64)} so that `--smoke --steps=5` runs 5 steps.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    fields = {f.name: (f, tp) for f, tp in _fields(cls)}
    for name, (_, tp) in fields.items():   # a mistake in the script, not in the command line: TypeError
        if not _supported(tp):
            raise TypeError(f"parse_config: {cls.__name__}.{name} has type {_type_name(tp)}; supported: bool, int, "
                            "float, str, and tuple/list of them")
    valid = ", ".join(fields)
    command = None
    if "-h" in argv or "--help" in argv:
        print(format_help(cls, commands))
        raise SystemExit(0)
    if commands and argv and not argv[0].startswith("-"):
        command = argv.pop(0)
        if command not in commands:
            raise SystemExit(f"config error: unknown command {command!r}; expected one of: {', '.join(commands)}")
    kw, i = {}, 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if not a.startswith("--") or a == "--":
            what = f"command {a!r} (expected one of: {', '.join(commands)})" if commands else f"argument {a!r}"
            raise SystemExit(f"config error: unexpected {what}; options are --key=value with keys: {valid}")
        key, eq, val = a[2:].partition("=")
        key = key.replace("-", "_")
        if key not in fields and key.startswith("no_") and key[3:] in fields and fields[key[3:]][1] is bool and not eq:
            kw[key[3:]] = False
            continue
        if key not in fields and RENAMED.get(key, ("",))[0] in fields:
            new, how = RENAMED[key]
            raise SystemExit(f"config error: --{key} is now --{new}{how} (one name per concept in every script)")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise SystemExit(f"config error: unknown config key --{key}{hint} for {cls.__name__}; valid keys: {valid}")
        tp = fields[key][1]
        if not eq:
            nxt = argv[i] if i < len(argv) else None
            if tp is bool and (nxt is None or nxt.lower() not in _TRUE | _FALSE):
                kw[key] = True
                continue
            if nxt is None:
                raise SystemExit(f"config error: --{key} needs a value of type {_type_name(tp)}")
            val, i = nxt, i + 1
        kw[key] = _convert(val, tp, key)
    missing = [n for n, (f, _) in fields.items() if _default(f) is dataclasses.MISSING and n not in kw]
    if missing:
        raise SystemExit(f"config error: missing required key(s): {', '.join('--' + m for m in missing)}")
    for flag, values in (presets or {}).items():
        bad = [k for k in [flag, *values] if k not in fields]
        if bad:
            raise ValueError(f"parse_config presets: {bad} are not fields of {cls.__name__}")
        on = kw.get(flag, _default(fields[flag][0]))
        if on:
            kw.update({k: v for k, v in values.items() if k not in kw})
    cfg = cls(**kw)
    if commands is not None:
        object.__setattr__(cfg, "_command", command)
    return cfg


def run_cli(main):
    """A script's entry point: `if __name__ == "__main__": run_cli(main)`. Runs main() (which reads sys.argv).

    Bad input ends the process with one line on stderr, `error: <message>`, and exit status 2, no traceback; the
    messages of our own checks name the file or key and what was expected. `--debug` anywhere on the command line is
    removed from sys.argv before main() runs (so parse_config never sees it) and re-raises instead, for the full
    traceback. KeyboardInterrupt: one line, status 130. SystemExit (--help, parse_config's errors) passes unchanged.

    What counts as bad input, i.e. gets one line:
    - OSError (FileNotFoundError, PermissionError, IsADirectoryError, ...): a path that cannot be read or written;
    - safetensors' SafetensorError: a truncated file, or not a safetensors file;
    - ValueError, KeyError, RuntimeError raised by a `raise` statement of the program itself, i.e. outside the
      standard library and installed packages: our own checks. The same types raised inside torch or numpy are most
      often a bug of ours (a matmul's shape mismatch, a bad unpacking), so they keep their traceback, as do TypeError,
      IndexError, AttributeError, AssertionError and everything else: hiding a bug is worse than a long message.
    torch re-raises a DataLoader worker's exception from its own code: of those only OSError and SafetensorError
    count, shown as the original's last line.
    """
    debug = "--debug" in sys.argv[1:]
    sys.argv[1:] = [a for a in sys.argv[1:] if a != "--debug"]
    try:
        return main()
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - filtered by _bad_input, everything else re-raised
        if debug or not _bad_input(e):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)


def _safetensors_error(e):
    st = sys.modules.get("safetensors")   # not imported by the program: cannot be its error
    return st is not None and isinstance(e, getattr(st, "SafetensorError", ()))


def _bad_input(e):
    """run_cli's rule (see there): True when `e` is bad input, False when it may be a bug."""
    if isinstance(e, OSError) or _safetensors_error(e):
        return True
    if not isinstance(e, (ValueError, KeyError, RuntimeError)):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:   # down to the frame that raised it
        tb = tb.tb_next
    if tb is None:
        return False
    path = tb.tb_frame.f_code.co_filename
    stdlib = os.path.dirname(os.__file__)   # site-packages of a plain install lie under it too
    if path.startswith(stdlib + os.sep) or "site-packages" in path or "dist-packages" in path:
        return False
    # a `raise` statement, not a failed operation (a multi-line raise reports its first line)
    return linecache.getline(path, tb.tb_lineno).lstrip().startswith("raise")


def _one_line(e):
    """The exception's message on one line; a KeyError's message without the quotes its str() adds."""
    msg = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if any(ln.endswith("Traceback (most recent call last):") for ln in lines):
        lines = lines[-1:]   # torch re-raising a DataLoader worker's error: the original's last line says it
    msg = " ".join(lines) or type(e).__name__
    if _safetensors_error(e):   # its messages name no file
        msg = f"safetensors: {msg} (a truncated file, or not a safetensors file?)"
    return msg


def _jsonable(obj):
    """Recursively convert dataclasses, numpy, torch, paths, sets and tuples into JSON-native values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return config_to_dict(obj)
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (str, int, float, bool)) else k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool, int, type(None))):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    tname = type(obj).__module__.split(".")[0]
    if tname in ("numpy", "torch") and hasattr(obj, "tolist"):
        if tname == "torch":
            obj = obj.detach().cpu()
        return _jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    if tname == "torch":  # torch.device / torch.dtype
        return str(obj)
    raise TypeError(f"save_json: cannot serialise object of type {type(obj).__name__}: {obj!r}")


def config_to_dict(cfg):
    """Resolved config as a plain JSON-ready dict (dataclass fields, plus `_command` when set)."""
    d = {f.name: _jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if getattr(cfg, "_command", None) is not None:
        d["_command"] = cfg._command
    return d


def save_json(path, obj, indent=2):
    """Write `obj` as JSON atomically: a temporary file in the same folder, fsync, then os.replace.

    Handles dataclasses, numpy / torch scalars and arrays, Paths, tuples and sets. Non-finite floats are written
    as NaN/Infinity (Python's json reads them back)."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(_jsonable(obj), indent=indent)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _fmt(v):
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        s = "[" + ", ".join(_fmt(x) for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"
        return s
    try:
        return _fmt(_jsonable(v))
    except TypeError:
        return str(v)


def print_table(results, title=None, file=None):
    """Print `results` (a possibly nested dict) as an aligned two-column table; nested keys joined with dots.

    Floats get 4 decimals (or 4 significant digits when tiny/huge). Returns the printed string."""
    flat = _flatten(_jsonable(results) if not isinstance(results, dict) else results)
    rows = [(k, _fmt(v)) for k, v in flat.items()]
    wk = max([len(k) for k, _ in rows] + [len("key")])
    wv = max([len(v) for _, v in rows] + [len("value")])
    bar = "-" * (wk + wv + 3)
    lines = []
    if title:
        lines += [title]
    lines += [bar, f"{'key':<{wk}} | {'value':>{wv}}", bar]
    lines += [f"{k:<{wk}} | {v:>{wv}}" for k, v in rows]
    lines += [bar]
    s = "\n".join(lines)
    print(s, file=file or sys.stdout, flush=True)
    return s

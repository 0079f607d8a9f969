"""Seeds as a first-class option: `python x.py --seeds=0,1,2` runs the default experiment once per seed and says,
for every effect the paper claims, whether the miniature shows it beyond seed-to-seed noise.

Each script lists its expected effects once, next to its results:

    EFFECTS = [
        Effect("linear probe: CatLIP within 3 pts of CLIP", "catlip_linear_probe_acc", "clip_linear_probe_acc",
               paper="CatLIP ViT-B/16 ImageNet-1k probe 0.788 vs CLIP 0.791 (Tab. 1)", margin=0.03),
        Effect("probe >= 2x chance and >= majority + 0.15", "catlip_linear_probe_acc",
               lambda r: max(2 * r["chance"], r["majority"] + 0.15), paper="(representation check)"),
    ]

and its main() begins with `if cfg.seeds: return run_seeds(main, argv, cfg, EFFECTS)`.

An effect compares `a` (a dotted key into results.json) with `b` (a dotted key, a number, or a function of the
results). Per seed s the paired difference is d_s = sign * (a_s - b_s) + margin (sign -1: the paper says a < b;
margin > 0: "a within `margin` of b"). Over n seeds: mean d, its standard error SE = std(d, ddof=1) / sqrt(n), and
the verdict **shown** when n >= 2 and mean d > 2 SE (a one-sided paired test, about t > 2), else **not shown**.
The differences are paired because both arms of one seed share the world, the init and the batch order.

Writes, under cfg.out: seed{s}/ (each seed's full run: results.json, plots, stages), seeds.json (per-seed values,
mean ± std of both arms, mean d ± SE, verdict) and sweep.png (per effect: the per-seed differences and mean ± 2 SE).
A finished seed{s}/ is reused stage by stage like any run (the scripts' fingerprints), so adding a seed costs one run.
"""
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Union

import numpy as np

from common.config import print_table, save_json


@dataclass
class Effect:
    name: str                            # what the paper claims, in a few words
    a: str                               # dotted key of results.json: the method's number
    b: Union[str, float, Callable]       # dotted key, a constant, or f(results) -> number: the baseline / bar
    paper: str = ""                      # the paper's figure (and where it is)
    sign: int = 1                        # +1: the paper says a > b; -1: a < b (a loss, an RMSE, forgetting)
    margin: float = 0.0                  # > 0: "a within margin of b" (d = sign * (a - b) + margin)
    note: Any = ""                       # what else the reader needs (chance level, protocol)


def lookup(results, key):
    """results['x']['y'] for key 'x.y'; a KeyError naming the key and the keys that exist at that level."""
    v = results
    for i, part in enumerate(key.split(".")):
        if not isinstance(v, dict) or part not in v:
            have = ", ".join(sorted(v)) if isinstance(v, dict) else type(v).__name__
            raise KeyError(f"effect key {key!r}: no {'.'.join(key.split('.')[:i + 1])!r} in results.json "
                           f"(has: {have})")
        v = v[part]
    return v


def _value(results, b):
    if callable(b):
        return float(b(results))
    if isinstance(b, str):
        return float(lookup(results, b))
    return float(b)


def summarize(per_seed, effects):
    """per_seed: {seed: results dict}. -> one row per effect with the per-seed values, mean ± std, d, SE, verdict."""
    seeds = sorted(per_seed)
    rows = []
    for e in effects:
        a = np.array([float(lookup(per_seed[s], e.a)) for s in seeds])
        b = np.array([_value(per_seed[s], e.b) for s in seeds])
        d = e.sign * (a - b) + e.margin
        n = len(seeds)
        se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        finite = bool(np.isfinite(d).all())
        shown = finite and n > 1 and float(d.mean()) > 2 * se
        verdict = ("shown" if shown else "not shown") if n > 1 else "n/a (1 seed)"
        rows.append(dict(effect=e.name, paper=e.paper, note=e.note, a=e.a,
                         b=e.b if isinstance(e.b, (str, int, float)) else "computed", sign=e.sign, margin=e.margin,
                         seeds=seeds, a_values=a.tolist(), b_values=b.tolist(), d_values=d.tolist(),
                         a_mean=float(a.mean()), a_std=float(a.std(ddof=1)) if n > 1 else 0.0,
                         b_mean=float(b.mean()), b_std=float(b.std(ddof=1)) if n > 1 else 0.0,
                         d_mean=float(d.mean()), d_se=se, verdict=verdict))
    return rows


def format_rows(rows):
    """The verdict table: effect, a and b as mean ± std, d as mean ± SE, and the verdict."""
    def pm(m, s):
        return f"{m:.3f} ± {s:.3f}"
    head = ("effect", "a (mean ± std)", "b (mean ± std)", "d (mean ± SE)", "verdict")
    body = [(r["effect"], pm(r["a_mean"], r["a_std"]), pm(r["b_mean"], r["b_std"]), pm(r["d_mean"], r["d_se"]),
             r["verdict"]) for r in rows]
    w = [max(len(x[i]) for x in [head] + body) for i in range(5)]
    line = lambda x: " | ".join(f"{c:<{w[i]}}" for i, c in enumerate(x))  # noqa: E731
    bar = "-" * len(line(head))
    return "\n".join([bar, line(head), bar] + [line(x) for x in body] + [bar])


def sweep_plot(path, rows):
    """Per effect: the per-seed paired differences d_s (points), 0 (the no-effect line) and mean ± 2 SE."""
    from common.plot import line_plot, panel
    panels = []
    for r in rows:
        xs = list(range(len(r["seeds"])))
        m, se = r["d_mean"], (r["d_se"] if math.isfinite(r["d_se"]) else 0.0)
        grid = list(np.linspace(-0.5, len(xs) - 0.5, 25))   # the bars drawn as dotted lines (a scatter plot)
        series = {"d per seed": (xs, r["d_values"], (31, 119, 180)),
                  "0 (no effect)": (grid, [0.0] * len(grid), (150, 150, 150)),
                  "mean - 2 SE": (grid, [m - 2 * se] * len(grid), (214, 39, 40))}
        panels.append(panel(f"{r['effect'][:46]}: {r['verdict']}", series, xlabel="seed index",
                            ylabel="d", points=True, labels={"d per seed": [f"s{s}" for s in r["seeds"]]}))
    line_plot(path, panels, size=(460, 300), cols=min(3, len(panels)))
    return path


def parse_seeds(text):
    """'0,1,2' -> [0, 1, 2] (also '0-4'); a ValueError naming the value otherwise."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out += list(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--seeds={text!r}: expected comma-separated integers such as 0,1,2") from None
    if not out or len(set(out)) != len(out):
        raise ValueError(f"--seeds={text!r}: expected distinct comma-separated integers such as 0,1,2")
    return out


def run_seeds(main, argv, cfg, effects):
    """Run main(argv with --seed=s --out=cfg.out/seed{s}) for every seed of cfg.seeds; main returns its results
    dict (rank 0; other ranks may return None). Rank 0 writes seeds.json and sweep.png, prints the verdict table,
    and returns {'seeds': ..., 'effects': rows}."""
    import sys
    from common.train import keep_process_group
    seeds = parse_seeds(cfg.seeds)
    argv = list(sys.argv[1:] if argv is None else argv)
    drop = ("--seeds", "--seed", "--out")
    if any(x in drop for x in argv):
        raise ValueError("--seeds: give --seeds, --seed and --out as --key=value (not '--key value')")
    base = [x for x in argv if x.split("=", 1)[0] not in drop]
    master = int(os.environ.get("RANK", 0)) == 0
    per_seed, walls = {}, {}
    with keep_process_group():  # under torchrun: one process group for all seeds (see common/train.py)
        for s in seeds:
            t0 = time.time()
            r = main(base + [f"--seed={s}", f"--out={os.path.join(cfg.out, f'seed{s}')}"])
            walls[s] = time.time() - t0
            per_seed[s] = r
    if not master:
        return None
    rows = summarize(per_seed, effects)
    out = dict(seeds=seeds, wall_s={str(s): round(w, 1) for s, w in walls.items()}, effects=rows)
    save_json(os.path.join(cfg.out, "seeds.json"), out)
    sweep_plot(os.path.join(cfg.out, "sweep.png"), rows)
    print(f"\n{len(seeds)} seeds {seeds}: d = sign * (a - b) + margin per seed; shown when mean d > 2 SE")
    print(format_rows(rows), flush=True)
    print_table({f"wall_s.seed{s}": w for s, w in walls.items()})
    return out


def markdown_table(paths):
    """The README's results table from seeds.json files: one row per effect, the paper's figure, ours (a vs b as
    means over seeds), d as mean ± 2 SE (about a 95% interval), the verdict, and the seeds behind it."""
    import json
    lines = ["| script | effect | paper | ours: a vs b (mean) | d ± 2 SE | verdict | seeds |",
             "|---|---|---|---|---|---|---|"]
    for p in paths:
        with open(p) as f:
            res = json.load(f)
        name = os.path.basename(os.path.dirname(os.path.abspath(p)))
        for r in res["effects"]:
            ci = 2 * r["d_se"] if r["d_se"] == r["d_se"] else float("nan")
            lines.append(f"| {name} | {r['effect']} | {r['paper'] or '-'} | {r['a_mean']:.3f} vs {r['b_mean']:.3f} | "
                         f"{r['d_mean']:+.3f} ± {ci:.3f} | **{r['verdict']}** | {len(r['seeds'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    if len(sys.argv) < 3 or sys.argv[1] != "table":
        raise SystemExit("usage: python -m common.seeds table runs/*/seeds.json   (a markdown table of the verdicts)")
    print(markdown_table(sys.argv[2:]))

"""The committed results (results/X/) and the README's results table say the same thing.

results/X/seed{s}/results.json are the per-seed outputs of `python X.py --seeds=0,1,2`; results/X/seeds.json is what
common.seeds.run_seeds summarised from them. These tests recompute every verdict from the per-seed files with each
script's current EFFECTS, and rebuild the README table and its shown count from the committed seeds.json files, so a
changed effect definition, an edited number or a stale README fails here."""
import importlib
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.seeds import markdown_table, summarize  # noqa: E402

SCRIPTS = ["catlip", "mobileclip", "reinforce", "subclone", "samclip", "fastfill", "tic", "clip"]  # README order
RESULTS = ROOT / "results"


def _load(path):
    with open(path) as f:
        return json.load(f)


def _readme_table():
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| script | effect | paper | ours: a vs b (mean) | d ± 2 SE | verdict | seeds |")
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return lines[start:end]


@pytest.mark.parametrize("name", SCRIPTS)
def test_verdicts_follow_from_the_per_seed_results(name):
    seeds_json = _load(RESULTS / name / "seeds.json")
    per_seed = {s: _load(RESULTS / name / f"seed{s}" / "results.json") for s in seeds_json["seeds"]}
    assert sorted(per_seed) == [0, 1, 2]
    effects = importlib.import_module(name).EFFECTS
    rows = summarize(per_seed, effects)
    assert [r["effect"] for r in rows] == [r["effect"] for r in seeds_json["effects"]]
    for new, old in zip(rows, seeds_json["effects"]):
        assert new["verdict"] == old["verdict"], new["effect"]
        assert new["d_values"] == pytest.approx(old["d_values"], rel=1e-9, abs=1e-12), new["effect"]


def test_readme_table_is_the_committed_results():
    want = markdown_table([str(RESULTS / n / "seeds.json") for n in SCRIPTS]).splitlines()
    assert _readme_table() == want


def test_readme_shown_count():
    verdicts = [r["verdict"] for n in SCRIPTS for r in _load(RESULTS / n / "seeds.json")["effects"]]
    m = re.search(r"\*\*(\d+) of (\d+) expected effects and checks are shown; (\d+) (?:is|are) not\*\*",
                  (ROOT / "README.md").read_text())
    assert m, "README: the '**N of M expected effects and checks are shown; K are not**' line is missing"
    shown, total, not_shown = map(int, m.groups())
    assert (shown, total, not_shown) == (verdicts.count("shown"), len(verdicts), verdicts.count("not shown"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_committed_runs_used_the_current_defaults(name):
    """Each committed seed ran the script's default experiment as the code now defines it: its saved config equals
    the Config defaults in every field but the run's own (out, seed, seeds), so a changed default fails here until
    the 3-seed run is redone."""
    import dataclasses
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (JSON has no tuples)
    fields = dataclasses.fields(importlib.import_module(name).Config)
    want = {f.name: norm(f.default) for f in fields if f.default is not dataclasses.MISSING}
    for s in (0, 1, 2):
        got = _load(RESULTS / name / f"seed{s}" / "config.json")
        assert got["seed"] == s
        diff = {k: (got.get(k, "<missing>"), v) for k, v in want.items()
                if k not in ("out", "seed", "seeds") and norm(got.get(k, "<missing>")) != v}
        assert not diff, f"results/{name}/seed{s}/config.json differs from {name}.Config (saved, default): {diff}"

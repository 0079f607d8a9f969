"""common.seeds: paired differences, standard errors and verdicts against hand-computed cases; --seeds end to end."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.seeds import Effect, parse_seeds, run_seeds, summarize  # noqa: E402


def _runs(a, b):
    return {s: {"x": {"a": ai}, "b": bi, "chance": 0.1} for s, (ai, bi) in enumerate(zip(a, b))}


def test_shown_when_mean_exceeds_two_standard_errors():
    # d = 0.1, 0.2, 0.3: mean 0.2, std 0.1, SE 0.1 / sqrt(3) = 0.0577 -> 0.2 > 0.115: shown
    r, = summarize(_runs([0.6, 0.7, 0.8], [0.5, 0.5, 0.5]), [Effect("e", "x.a", "b")])
    assert r["d_mean"] == pytest.approx(0.2) and r["d_se"] == pytest.approx(0.1 / math.sqrt(3))
    assert r["verdict"] == "shown" and r["a_std"] == pytest.approx(0.1)


def test_not_shown_inside_noise_and_in_the_wrong_direction():
    # d = 0.1, -0.1, 0.05: mean 0.0167, SE 0.0601: inside the noise
    r, = summarize(_runs([0.6, 0.4, 0.55], [0.5, 0.5, 0.5]), [Effect("e", "x.a", "b")])
    assert r["verdict"] == "not shown"
    # a clearly larger, but the paper says smaller (sign -1): not shown
    r, = summarize(_runs([0.6, 0.7, 0.8], [0.5, 0.5, 0.5]), [Effect("e", "x.a", "b", sign=-1)])
    assert r["d_mean"] == pytest.approx(-0.2) and r["verdict"] == "not shown"


def test_margin_callable_and_constant_bars():
    # "a within 0.03 of b": a - b = -0.01, -0.02, -0.015 -> d = 0.02, 0.01, 0.015: shown
    r, = summarize(_runs([0.49, 0.48, 0.485], [0.5, 0.5, 0.5]), [Effect("e", "x.a", "b", margin=0.03)])
    assert r["d_values"] == pytest.approx([0.02, 0.01, 0.015]) and r["verdict"] == "shown"
    # a bar computed from the results (2 x chance = 0.2) and a constant
    r1, r2 = summarize(_runs([0.25, 0.3, 0.22], [0, 0, 0]),
                       [Effect("2x chance", "x.a", lambda res: 2 * res["chance"]), Effect("c", "x.a", 0.26)])
    assert r1["b_values"] == [0.2, 0.2, 0.2] and r1["verdict"] == "shown"
    assert r2["verdict"] == "not shown"


def test_zero_variance_positive_is_shown_and_one_seed_has_no_verdict():
    r, = summarize(_runs([0.6, 0.6, 0.6], [0.5, 0.5, 0.5]), [Effect("e", "x.a", "b")])
    assert r["d_se"] == pytest.approx(0.0, abs=1e-12) and r["verdict"] == "shown"
    r, = summarize(_runs([0.6], [0.5]), [Effect("e", "x.a", "b")])
    assert r["verdict"] == "n/a (1 seed)"


def test_missing_key_names_it():
    with pytest.raises(KeyError, match="'x.zz'.*has: a"):
        summarize(_runs([0.6, 0.7], [0.5, 0.5]), [Effect("e", "x.zz", "b")])


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("3-5") == [3, 4, 5]
    for bad in ("", "a,b", "1,1"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_run_seeds_runs_main_per_seed_and_writes_verdicts(tmp_path):
    calls = []

    class Cfg:
        out, seeds = str(tmp_path), "0,1,2"

    def main(argv):
        calls.append(argv)
        s = int([a for a in argv if a.startswith("--seed=")][0].split("=")[1])
        return {"x": {"a": 0.5 + 0.1 * (s + 1)}, "b": 0.5}

    out = run_seeds(main, ["--steps=3", "--seeds=0,1,2", "--out=elsewhere"], Cfg, [Effect("e", "x.a", "b")])
    assert [c[-2:] for c in calls] == [[f"--seed={s}", f"--out={tmp_path / f'seed{s}'}"] for s in (0, 1, 2)]
    assert all(c[0] == "--steps=3" and len(c) == 3 for c in calls)
    saved = json.loads((tmp_path / "seeds.json").read_text())
    assert saved["effects"][0]["verdict"] == out["effects"][0]["verdict"] == "shown"
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="--key=value"):
        run_seeds(main, ["--seeds", "0,1"], Cfg, [])


def test_markdown_table_from_seeds_json(tmp_path):
    from common.seeds import markdown_table
    from common.config import save_json
    rows = summarize(_runs([0.6, 0.7, 0.8], [0.5, 0.5, 0.5]), [Effect("e", "x.a", "b", paper="+10 pts")])
    (tmp_path / "demo").mkdir()
    save_json(tmp_path / "demo" / "seeds.json", {"seeds": [0, 1, 2], "effects": rows})
    table = markdown_table([str(tmp_path / "demo" / "seeds.json")])
    assert "| demo | e | +10 pts | 0.700 vs 0.500 | +0.200 ± 0.115 | **shown** | 3 |" in table

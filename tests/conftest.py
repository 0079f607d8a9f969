"""Shared pytest fixtures: real reference files (fetched by .ci/run, never committed, never needed at run time)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REF = ROOT / ".cache" / "ref"


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


@pytest.fixture(scope="session")
def bpe_path():
    """CLIP's merges file (bpe_simple_vocab_16e6.txt.gz) from the open-clip-torch wheel; skip when absent."""
    p = Path(os.environ.get("CLIPBOOK_BPE", REF / "bpe_simple_vocab_16e6.txt.gz"))
    if not p.is_file():
        pytest.skip(f"CLIP merges file not found at {p} (set CLIPBOOK_BPE or run .ci/run)")
    return p


@pytest.fixture(scope="session")
def wordnet_dir():
    """A WordNet 3.0 database directory (index.noun, data.noun, noun.exc); skip when absent."""
    cands = [os.environ.get("CLIPBOOK_WORDNET"), REF / "wordnet-3.0", "/usr/share/wordnet"]
    for c in cands:
        if c and (Path(c) / "index.noun").is_file():
            return Path(c)
    pytest.skip("WordNet 3.0 files not found (set CLIPBOOK_WORDNET or run .ci/run)")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for it in items:
        if "cuda" in it.keywords:
            it.add_marker(skip)

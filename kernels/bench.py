"""Kernel benchmarks (not tests): `python -m kernels.bench attention|bce|all` (default all).

Each kernel module owns its benchmark as a `bench()` function (shapes, FLOP/byte model, baseline); this file only
dispatches. On CUDA they time the Triton kernel against the PyTorch baseline; on CPU they say so and time the
reference only. Numbers and the commands that produced them go in kernels/README.md.
"""
import importlib
import sys

KERNELS = ("attention", "bce")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = argv or ["all"]
    bad = [n for n in names if n not in KERNELS + ("all",)]
    if bad:
        sys.exit(f"kernels.bench: unknown kernel {bad[0]!r}; expected one of {', '.join(KERNELS + ('all',))}")
    todo = KERNELS if "all" in names else [n for n in KERNELS if n in names]
    for name in todo:
        bench = getattr(importlib.import_module(f"kernels.{name}"), "bench", None)
        if bench is None:
            print(f"kernels.{name} has no bench() yet; skipped")
            continue
        print(f"== {name}")
        bench()


if __name__ == "__main__":
    main()

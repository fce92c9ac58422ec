"""``python -m benchmarks.train``: the same command as ``gradbench-train``
(:mod:`benchmarks.cli.train`)."""

from benchmarks.cli.train import main

if __name__ == "__main__":
    main()

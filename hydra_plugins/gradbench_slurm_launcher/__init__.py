"""gradbench's SLURM launcher as a Hydra plugin (Hydra instantiates launchers only from the
``hydra_plugins`` namespace). The work is in :mod:`benchmarks.harness.slurm`, imported when a
sweep launches, so Hydra's plugin scan stays cheap."""

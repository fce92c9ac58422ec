"""Console entry points, one small module per command: ``gradbench-train`` (:mod:`.train`),
``gradbench-probe`` (:mod:`.probe`), ``gradbench-demo`` (:mod:`.demo`). ``gradbench-data`` is
:mod:`benchmarks.data.download` and ``gradbench-report`` :mod:`benchmarks.report.cli`."""

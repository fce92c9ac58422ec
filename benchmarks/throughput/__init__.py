"""Throughput: timed cases as a library, hand-written reference steps, the pytest-benchmark
suites (``bench_*.py``), their summaries and the interleaved harness/hand-written overhead
measurement, and the allocator measurement."""

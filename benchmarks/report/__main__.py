"""``python -m benchmarks.report``."""

from benchmarks.report.cli import main

raise SystemExit(main())

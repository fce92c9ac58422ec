"""Run records, torch-free: the atomic writer and checksums (:mod:`.files`), ``run.json`` and
the tidy metrics table (:mod:`.runs`). ``run -> records``; the report reads them."""

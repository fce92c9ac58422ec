"""Data sets: loading (embedded offline sets, files under ``data.root``, a synthetic sigmoid
belief network), binarization and the batch stream (:mod:`.datasets`), and the
``gradbench-data`` command that downloads and verifies the file-based sets (:mod:`.download`)."""

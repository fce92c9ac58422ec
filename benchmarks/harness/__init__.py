"""The training harness: config schemas and validation, data-independent building of a run's
pieces (model, estimator, optimizer), the training step, evaluation, the run and its lifecycle,
checkpoints and supervision. ``conf -> run``."""

"""rnnlab's Optuna sweeper, where Hydra looks for plugins (``hydra_plugins``); the code is in ``pipeline.sweep``."""

from pipeline.sweep import OptunaSweeper as _OptunaSweeper


class OptunaSweeper(_OptunaSweeper):
    """``hydra/sweeper=optuna``: persistent Optuna studies with pruning (see ``pipeline.sweep.OptunaSweeper``)."""

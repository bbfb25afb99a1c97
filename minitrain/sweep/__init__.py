"""``minitrain sweep``: hyperparameter search on Optuna, each trial an ordinary run."""

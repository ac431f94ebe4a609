"""The search stage: an Optuna study over training settings, NaN trials pruned with their
cause, and the safest configuration confirmed under stress. This package owns Optuna."""

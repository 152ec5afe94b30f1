"""Training on the pairs: the MPO recipe over TRL, its config and data, the evaluations, export, ablation."""

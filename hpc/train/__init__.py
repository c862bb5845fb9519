"""`hpc train`: the trainer, its model, losses, metrics, validation, checkpoints and logs."""

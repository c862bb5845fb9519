"""`hpc evaluate`: every repair method scored against measured and noise-free counts."""

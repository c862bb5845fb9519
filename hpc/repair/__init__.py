"""Repairing sinograms with a trained network: `hpc predict`, `hpc export`."""

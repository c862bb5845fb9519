"""`hpc convert`: raw / Interfile sinograms -> a dataset of chunked HDF5 shards."""

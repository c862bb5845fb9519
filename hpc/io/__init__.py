"""File formats (Interfile/raw sinograms, shard format v1) and atomic file helpers."""

"""`hpc simulate`: phantoms -> projections -> physics -> counts, in a scanner's layout."""

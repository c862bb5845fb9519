"""Launch layer: `hpc submit`, `hpc sweep`, `hpc sbatch` (it uses hpc.distributed; no library module imports it)."""

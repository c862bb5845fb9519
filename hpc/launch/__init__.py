"""Launch layer: launcher env -> torch env (env.py), `hpc submit`, `hpc sweep`, `hpc sbatch`."""

"""Everything distributed, in one package (nothing here imports the launch package; it uses this):

    launcher.py   which launcher started us (torchrun, srun, submitit, mpirun) -> torch's variables
    nodelist.py   Slurm host lists ("dgx[01-02]-ib") -> host names (scontrol, else a parser)
    device.py     the one device resolver (auto | cpu | cuda -> torch.device, LOCAL_RANK's GPU)
    dist.py       the only module that calls torch.distributed (init, collectives, DDP wrap, shutdown)

Importing the package imports nothing else: `hpc convert` uses launcher.mpi_world() without torch.
"""

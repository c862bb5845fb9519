{{sbatch_options}}
set -euo pipefail
cd {{workdir}}

CONFIG={{config}}
RUN_DIR={{run_dir}}
TRAIN=(hpc train --config "$CONFIG" train.run_dir="$RUN_DIR"{{overrides}})
echo "$(date -Is) job $SLURM_JOB_ID attempt ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS task(s) on $SLURM_JOB_NODELIST"

# torch.distributed rendezvous on the first node of the allocation (one port per job)
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT

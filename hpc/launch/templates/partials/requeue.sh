# --- preemption and time limit ----------------------------------------------------------------
# Slurm signals this batch shell (B:USR2) {{signal_delay_s}} s before the time limit. The handler
# forwards USR2 to the training tasks, which finish their step, write a checkpoint and exit 75;
# then the job is requeued from here, on the host (scontrol is often missing inside containers).
# The next attempt resumes from the newest checkpoint in $RUN_DIR.
PREEMPTED=0
on_usr2() {
    PREEMPTED=1
    echo "$(date -Is) USR2: asking the training tasks to checkpoint"
    scancel --signal=USR2 "$SLURM_JOB_ID"  # every step's tasks, not this shell
}
trap on_usr2 USR2

# srun in the background: bash runs a trap only once its foreground child has exited.
run_step() {
    srun "$@" &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
    wait "$pid"  # the step's own exit status
}

finish() {  # $1: exit status of the training step
    if [[ $PREEMPTED == 1 || $1 == 75 ]]; then
        if (( ${SLURM_RESTART_COUNT:-0} < {{max_requeues}} )); then
            echo "$(date -Is) requeueing job $SLURM_JOB_ID (attempt ${SLURM_RESTART_COUNT:-0})"
            scontrol requeue "$SLURM_JOB_ID"
            exit 0
        fi
        echo "$(date -Is) not requeued: already requeued {{max_requeues}} times" >&2
    fi
    exit "$1"
}

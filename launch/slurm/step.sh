# Sourced by the Slurm batch scripts: `run_step srun ...` runs the training step so that every
# stop saves a checkpoint, and ends the batch script with the ranks' exit status.
#
# A USR1 or TERM to the batch shell is passed on with `scancel --signal` to every process of the
# job's steps, never to srun itself (srun answers TERM by killing the step). The ranks save and
# exit 75; after USR1 (the time-limit warning of --signal=B:USR1@N, or a user's
# `scancel --signal=USR1 --batch JOB`) the job requeues itself to resume. After TERM (scancel,
# preemption) it does not: a cancelled job stays cancelled, and a preempted one is requeued by
# Slurm's PreemptMode if at all. A finished run (exit 0) is never requeued.

# One array task, not the whole array: scancel and scontrol take an array's job id as all its tasks.
this_job="${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}"
this_job="${this_job:-${SLURM_JOB_ID:-}}"

run_step() {
  stop_signal=""
  # Traps first: a signal in the instant before the step starts must not kill this shell.
  trap 'pass_on USR1' USR1
  trap 'pass_on TERM' TERM
  "$@" &
  local step_pid=$! status=0
  # `wait` returns early when a trapped signal arrives: wait again until the step has ended.
  while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid" || status=$?; done
  if [[ "$status" == 75 && "$stop_signal" == USR1 ]]; then
    echo "stopped with a checkpoint before the time limit: requeueing job $this_job to resume from the run directory"
    scontrol requeue "$this_job"
  elif [[ "$status" == 75 ]]; then
    echo "stopped with a checkpoint (${stop_signal:+SIG$stop_signal, }exit 75): not requeued; resubmit to resume"
  fi
  exit "$status"
}

pass_on() {
  stop_signal="$1"
  echo "received SIG$1: asking the ranks to save and stop"
  scancel --signal="$1" "$this_job" || true
}

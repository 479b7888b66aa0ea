# shellcheck shell=bash
# The first words of an agent's SLURM job step (trx_remote.srun): say the step's id, which
# SrunAgentProcess.stop cancels the step by, then become the agent. Run by srun as
# `bash -c "$(cat srun_step.sh)" torchrunx-step AGENT-ARGV...` (the command of agent.sh).
printf 'torchrunx-step %s.%s\n' "$SLURM_JOB_ID" "$SLURM_STEP_ID"
exec "$@"

# shellcheck shell=bash
# The first process of an agent started over SSH, in the agent's own session (under
# `setsid --wait`). Run as `bash -c "$(cat ssh_wrapper.sh)" torchrunx-agent AGENT_ARGV...`.
#
# 1. Prints the session id (its own pid, after setsid) on a line of its own, for the reaper.
# 2. Reads the agent's environment from stdin, as NUL-terminated NAME=VALUE entries ended by an
#    empty entry, and exports it. Values travel on stdin, not on a command line, where `ps`
#    would show them to every user of the host for the whole run. `read` takes a pipe byte by
#    byte, so it consumes exactly the entries: the rest of stdin (the run's secret) is left to
#    the agent.
# 3. Becomes the agent command (trx_remote.command.agent_argv).
printf 'torchrunx-agent-session %s\n' "$$"
while IFS= read -r -d '' __trx_entry && [ -n "$__trx_entry" ]; do
  export -- "${__trx_entry?}"  # names bash cannot export (UID...) are not sent: trx_remote.ssh says so
done
unset __trx_entry
exec "$@"

# shellcheck shell=bash
# The reaper of an agent started on this machine (trx_remote.executors.LocalAgentProcess),
# started right before it. Run as `bash -c "$(cat local_reaper.sh)" torchrunx-reaper`.
#
# stdin: the agent's mark (the NAME=VALUE entry every process of the agent has in its
# environment) on the first line, then the agent's pid. End of input before the agent runs
# Python (the launcher died, e.g. while the host's env_file still ran: the kernel closed the
# pipe; or the launcher is stopping the agent) means: SIGKILL every process carrying the mark,
# twice, for what was forked during the first sweep. Once the agent runs, it stops everything
# itself when the launcher goes, and this reaper exits: it is only needed until then.
IFS= read -r mark || exit 0
[ -n "$mark" ] || exit 0
IFS= read -r pid || pid=
while [ -n "$pid" ]; do
  read -r -t 0.1 _
  (($? > 128)) || break # a timeout, rather than the end of input
  mapfile -d '' -t words < "/proc/$pid/cmdline" 2>/dev/null
  [ "${words[1]-} ${words[2]-}" = "-m trx_core.agent" ] && exit 0 # the agent runs: python -m trx_core.agent
done
for _ in 1 2; do
  grep -lzxF -- "$mark" /proc/[0-9]*/environ | while IFS= read -r file; do
    pid=${file#/proc/}
    kill -KILL "${pid%/environ}"
  done
done 2>/dev/null
exit 0

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
  # Until the agent runs Python, its process is `bash -c <agent.sh> ...` (an env_file that execs
  # something else is the watcher's, in agent.sh). The module's name is not spelled out here, so
  # that nobody looking for agents by their command line takes this reaper for one.
  [ -n "${words[0]-}" ] && [ "${words[0]}" != bash ] && exit 0
done
for _ in 1 2; do
  grep -lzxF -- "$mark" /proc/[0-9]*/environ | while IFS= read -r file; do
    pid=${file#/proc/}
    kill -KILL "${pid%/environ}"
  done
done 2>/dev/null
exit 0

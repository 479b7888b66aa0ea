# shellcheck shell=bash
# The reaper of an agent started over SSH: started next to the agent, over the same connection,
# it kills every process the agent started once told to, or once the connection ends. Run as
# `bash -c "$(cat reaper.sh)" torchrunx-reaper TICKS`: after SIGTERM it waits up to TICKS x 20 ms
# for the agent's session leader to exit.
#
# stdin: the agent's mark (the NAME=VALUE entry every process of the agent has in its
# environment) on the first line, then, when the agent is to be stopped, its session id. End of
# input (the launcher died, the connection broke) means the same, without the session id.
#
# SIGTERM first (the agent kills its workers and exits). Then SIGKILL whatever is left in the
# session or carries the mark: workers' children that left the session, or everything if the
# agent was SIGKILLed and could not clean up. Twice, for what was forked during the first sweep.
# Started in advance, it is ready the moment it is needed: a new SSH session costs a login
# shell's start-up (~0.3 s with pyenv or conda).
IFS= read -r mark || exit 0
[ -n "$mark" ] || exit 0
read -r sid
if [ -n "$sid" ] && kill -TERM "$sid" 2>/dev/null; then
  for _ in $(seq "$1"); do kill -0 "$sid" 2>/dev/null || break; sleep 0.02; done
fi
for _ in 1 2; do
  for dir in /proc/[0-9]*; do
    read -r line < "$dir/stat" || continue
    # The fields after the command name, split on purpose: $4 is the session id.
    # shellcheck disable=SC2086
    set -- ${line##*) }
    [ -n "$sid" ] && [ "$4" = "$sid" ] && kill -KILL "${dir#/proc/}"
  done
  grep -lzxF -- "$mark" /proc/[0-9]*/environ | while IFS= read -r file; do
    pid=${file#/proc/}
    kill -KILL "${pid%/environ}"
  done
done 2>/dev/null
exit 0

# shellcheck shell=bash
# Starts a torchrunx agent: cd to the launcher's working directory, source env_file, exec the
# launcher's Python interpreter. Run as `bash -c "$(cat agent.sh)" torchrunx-agent CWD ENV_FILE
# PYTHON ARGS...` (ENV_FILE "" for none): values arrive as positional parameters, never pasted
# into this text, so none needs quoting.
#
# When the agent cannot be started, one line on stderr starting with "torchrunx:" and naming
# the host says why (trx_remote.command.describe_end reads it).
#
# The env_file runs with no arguments and stdin from /dev/null (stdin carries the run's
# secret, for the agent). It may `exit`, `set -e`, `shift` or overwrite variables: what this
# script needs is kept under names no env_file uses, and an EXIT trap reports an env_file that
# ends the shell. One that `exec`s a program replaces this shell, and the agent would never
# start: a watcher in the background sees this process become something that is neither this
# script nor the agent, says so and kills it, so that the launcher hears of it at once rather
# than after its timeout.
__trx_host=${HOSTNAME:-$(hostname)}
cd -- "$1" 2>/dev/null || { echo "torchrunx: working directory $1 does not exist on host $__trx_host" >&2; exit 97; }
__trx_env_file=$2
shift 2
__trx_agent=("$@")
__trx_watch_exec() {  # SELF: this shell's command line, read before the env_file could replace it
  local -a words
  local self=$1 agent=${__trx_agent[*]} now
  while sleep 0.1; do
    mapfile -d '' -t words < "/proc/$$/cmdline" 2>/dev/null || return 0
    now=${words[*]}
    # Empty: the shell ended (a zombie for a moment). The agent's command: the env_file returned.
    if [ -z "$now" ] || [ "$now" = "$agent" ]; then
      return 0
    elif [ "$now" != "$self" ]; then
      echo "torchrunx: env_file $__trx_env_file on host $__trx_host replaced the agent's shell with \`$now\` \
(exec), so the agent cannot start: run that program without exec, or out of the env_file" >&2
      kill -KILL "$$"
      return 0
    fi
  done
}
if [ -n "$__trx_env_file" ]; then
  if ! [ -f "$__trx_env_file" ] || ! [ -r "$__trx_env_file" ]; then
    echo "torchrunx: env_file $__trx_env_file is missing or not readable on host $__trx_host" >&2
    exit 98
  fi
  # Single quotes on purpose: the status and names are those at exit time, not now.
  # shellcheck disable=SC2016
  trap '__trx_status=$?; echo "torchrunx: env_file $__trx_env_file exited with status $__trx_status \
on host $__trx_host" >&2' EXIT
  mapfile -d '' -t __trx_words < "/proc/$$/cmdline"
  __trx_watch_exec "${__trx_words[*]}" </dev/null &
  set --
  # shellcheck source=/dev/null  # the user's file, known only at run time
  source "$__trx_env_file" </dev/null
  __trx_status=$?
  trap - EXIT
  if [ "$__trx_status" != 0 ]; then
    echo "torchrunx: env_file $__trx_env_file failed with status $__trx_status on host $__trx_host" >&2
    exit 98
  fi
fi
if ! command -v "${__trx_agent[0]}" >/dev/null 2>&1; then
  echo "torchrunx: python interpreter ${__trx_agent[0]} not found on host $__trx_host" >&2
  exit 99
fi
exec "${__trx_agent[@]}"

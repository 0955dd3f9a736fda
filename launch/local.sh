#!/usr/bin/env bash
# Runs `python -m collab_rl.main` as N local processes on CPU, the way a TPU slice runs one process
# per host: each process gets its own fake CPU devices, they meet at a coordinator on 127.0.0.1
# and all-reduce over gloo. This is how multi-host code is exercised without a pod.
#
#   launch/local.sh -n 2 -d 4 -- --config=experiments/lm_synthetic.py:runlocal --workdir=/tmp/lm2
#
# -n processes (default 2), -d fake CPU devices per process (default 4), -p coordinator port
# (default: a free one), -l directory for the per-process logs (default: WORKDIR/logs, else a temp
# dir). Process 0's output streams to this terminal; every process also logs to process_<i>.log.
# Exits non-zero when any process fails; Ctrl-C stops all of them.
set -euo pipefail

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

num_processes=2
devices=4
port=""
log_dir=""
while getopts "n:d:p:l:h" opt; do
  case "$opt" in
    n) num_processes="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    l) log_dir="$OPTARG" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift

for pair in "-n:$num_processes" "-d:$devices"; do
  if ! [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/local.sh: ${pair%%:*} must be a positive integer, got '${pair#*:}'" >&2
    exit 2
  fi
done
if [[ $# -eq 0 ]]; then
  echo "launch/local.sh: no collab_rl.main flags given after --" >&2
  usage
fi
for arg in "$@"; do
  case "$arg" in
    --distributed|--coordinator_address*|--num_processes*|--process_id*)
      echo "launch/local.sh: do not pass $arg; the launcher sets it" >&2
      exit 2 ;;
  esac
done

python_bin="${PYTHON:-python}"
if [[ -z "$port" ]]; then
  port="$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')"
fi
if [[ -z "$log_dir" ]]; then
  for arg in "$@"; do
    [[ "$arg" == --workdir=* && "$arg" != --workdir=*://* ]] && log_dir="${arg#--workdir=}/logs"
  done
  [[ -z "$log_dir" ]] && log_dir="$(mktemp -d)"
fi
mkdir -p "$log_dir"

# Each process sees only its own devices; the flags a caller already set (e.g. XLA dumps) stay.
xla_flags="$(echo "${XLA_FLAGS:-}" | sed 's/--xla_force_host_platform_device_count=[0-9]*//g')"
export XLA_FLAGS="$xla_flags --xla_force_host_platform_device_count=$devices"
export JAX_PLATFORMS=cpu
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo

pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap cleanup INT TERM

for ((i = 0; i < num_processes; i++)); do
  cmd=("$python_bin" -m collab_rl.main "$@" --distributed
       "--coordinator_address=127.0.0.1:$port" "--num_processes=$num_processes" "--process_id=$i")
  if [[ $i -eq 0 ]]; then
    "${cmd[@]}" > >(tee "$log_dir/process_$i.log") 2>&1 &
  else
    "${cmd[@]}" > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

status=0
for ((i = 0; i < num_processes; i++)); do
  if ! wait "${pids[$i]}"; then
    echo "launch/local.sh: process $i failed; its log: $log_dir/process_$i.log" >&2
    status=1
    cleanup  # the others would wait for the failed one at the next collective
  fi
done
wait || true  # lets tee finish writing process 0's log
exit $status

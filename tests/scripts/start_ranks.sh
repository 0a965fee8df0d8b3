#!/usr/bin/env bash
# start_ranks.sh RANKS PORT COMMAND...: one job's ranks on this machine, each started directly with the variables a
# launcher sets, as srun starts its tasks (a launcher such as `deepspeed` adds seconds of its own to every launch).
# The job's status is its ranks' highest.
ranks=$1 port=$2
shift 2
pids=()
for ((rank = 0; rank < ranks; rank++)); do
    RANK=$rank WORLD_SIZE=$ranks LOCAL_RANK=$rank LOCAL_WORLD_SIZE=$ranks MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
        "$@" &
    pids+=($!)
done
worst=0
for pid in "${pids[@]}"; do
    wait "$pid"
    code=$?
    [ "$code" -gt "$worst" ] && worst=$code
done
exit "$worst"

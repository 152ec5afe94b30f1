# Shell functions that data.sbatch and train.sbatch share (sourced; sbatch runs a copy of each job script
# from the folder it was submitted in, so submit from the repository root).

# Send this job's output to LOG_DIR/NAME-JOBID.out, creating LOG_DIR: Slurm opens an `#SBATCH --output`
# file before the script runs and fails the job when its folder is missing, so the jobs leave Slurm its
# default slurm-JOBID.out (which gets this pointer and Slurm's own messages) and write their log here.
log_to() {
    local log="$1/${SLURM_JOB_NAME:-$2}-${SLURM_JOB_ID:-$$}.out"
    mkdir -p "$1" || exit 1
    echo "$2: job log in $log"
    exec >>"$log" 2>&1
}

# GPUs Slurm gave the calling step on this node: SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES' entries, else 0.
gpus_here() {
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        local ids
        IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    else
        echo 0
    fi
}

# The local IPv4 address that packets to host $1 leave from. Run on the head node with another node of the
# job as $1, it is the head's address on the network the nodes share (`hostname --ip-address` may give
# 127.0.1.1, an IPv6 address or another network's address first).
route_source() {
    local target
    target=$(getent ahostsv4 "$1" | awk 'NR == 1 {print $1}')
    [ -n "$target" ] && ip -4 route get "$target" | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n 1
}

# head_address HEAD [OTHER]: HEAD_IP when set, else the head's route source towards OTHER, checked: an IPv4
# address, and not a loopback one when other nodes must reach it.
head_address() {
    local address=${HEAD_IP:-}
    [ -n "$address" ] || address=$(srun --overlap --nodes=1 --ntasks=1 -w "$1" \
        bash -c "$(declare -f route_source); route_source \"\$1\"" route_source "${2:-$1}")
    if ! [[ $address =~ ^[0-9]+(\.[0-9]+){3}$ ]]; then
        echo "no IPv4 address found for the head node $1 (got '$address'): set HEAD_IP to its address on the nodes' network" >&2
        return 1
    fi
    if [ -z "${HEAD_IP:-}" ] && [ -n "${2:-}" ] && [[ $address == 127.* ]]; then
        echo "the head node $1 routes to $2 from loopback ($address): set HEAD_IP to its address on the nodes' network" >&2
        return 1
    fi
    echo "$address"
}

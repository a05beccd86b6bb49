#!/usr/bin/env bash
# A private two-node Slurm cluster on this machine, for tests and for trying `pipeline submit`.
#
#   slurm/testcluster.sh start DIR   # munge + slurmctld + two slurmd (node1, node2) under DIR
#   export SLURM_CONF=DIR/slurm.conf # then sbatch/squeue/pipeline submit talk to it
#   slurm/testcluster.sh stop DIR
#
# Both nodes are this machine (NodeAddr=127.0.0.1, one slurmd port each). Everything (munge key
# and socket, state, spool, logs) lives under DIR; nothing system-wide is touched. Run as root
# (SlurmUser=root), or as any user that can run munged and slurmd.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)
user=$(id -un)

start() {
    for tool in munged slurmctld slurmd sbatch scontrol; do
        command -v "$tool" >/dev/null || { echo "$0: $tool not found; apt-get install -y slurm-wlm munge" >&2; exit 1; }
    done
    mkdir -p "$dir"/{munge,state,spool,log,run}
    chmod 700 "$dir/munge"
    [ -f "$dir/munge/munge.key" ] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    local base=$(( ${SLURM_TESTCLUSTER_PORT:-$(( 16000 + RANDOM % 4000 ))} ))
    # Job ids (and so the rendezvous ports of multi-node jobs, pipeline.engine.slurm_job) start
    # here: two clusters on one machine (parallel test workers) give theirs apart.
    local first_job=$(( ${SLURM_TESTCLUSTER_FIRST_JOB_ID:-1} ))
    local cpus
    cpus=$(nproc)
    cat >"$dir/slurm.conf" <<CONF
ClusterName=pipeline-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$base
SlurmdPort=$(( base + 1 ))
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
DependencyParameters=kill_invalid_depend
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=3600
FirstJobId=$first_job
KillWait=10
InactiveLimit=0
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(( base + 2 )) CPUs=$cpus RealMemory=1000 State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(( base + 3 )) CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N node1
    slurmd -f "$SLURM_CONF" -N node2
    for _ in $(seq 60); do
        if [ "$(sinfo -h -o '%t' -N 2>/dev/null | grep -c idle)" -eq 2 ]; then
            echo "test cluster up: export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    echo "$0: nodes did not become idle; see $dir/log/" >&2
    sinfo -N >&2 || true
    exit 1
}

stop_pidfile() {
    local pidfile=$1
    [ -f "$pidfile" ] || return 0
    local pid
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

stop() {
    if [ -f "$dir/slurm.conf" ] && [ -f "$dir/run/slurmctld.pid" ]; then
        SLURM_CONF=$dir/slurm.conf scancel --user="$user" 2>/dev/null || true
    fi
    for pidfile in "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid" "$dir/munge/munged.pid"; do
        stop_pidfile "$pidfile"
    done
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac

#!/usr/bin/env bash
# A one-machine SLURM cluster, to try sparsebench's SLURM path (and for CI's SLURM test).
#
#   scripts/local_slurm.sh start     install Debian's slurm-wlm and munge if missing (root, apt),
#                                    start munged, slurmctld and slurmd bound to 127.0.0.1, and
#                                    print the line to evaluate:  export SLURM_CONF=...
#   scripts/local_slurm.sh stop      cancel this cluster's jobs, stop the daemons by their PIDs
#   scripts/local_slurm.sh status    the daemons' PIDs and the node's state
#
#   eval "$(scripts/local_slurm.sh start)" && sbatch --wrap=hostname
#
# Everything of this cluster (slurm.conf, munge key and socket, state, logs, PID files) lives in
# $SPARSEBENCH_SLURM_DIR (default ${TMPDIR:-/tmp}/sparsebench-slurm); nothing in /etc is
# written except, when the short host name does not resolve, one marked /etc/hosts line that
# `stop` removes. `start` is idempotent (a running cluster is left as it is) and quiet: stdout
# is the export line only, errors go to stderr with the log to read. Debian/Ubuntu, as root,
# with or without systemd; ports 6817 (slurmctld) and 6818 (slurmd) on 127.0.0.1, or
# $SPARSEBENCH_SLURM_PORT and the next one.
set -euo pipefail

DIR="${SPARSEBENCH_SLURM_DIR:-${TMPDIR:-/tmp}/sparsebench-slurm}"
CONF="$DIR/slurm.conf"
CTLD_PORT="${SPARSEBENCH_SLURM_PORT:-6817}"
SLURMD_PORT=$((CTLD_PORT + 1))
HOSTS_MARK="# sparsebench local_slurm"
HOST="$(hostname -s)"

say() { echo "local_slurm: $*" >&2; }
die() { say "$*"; exit 1; }
pid_of() { [[ -s "$DIR/$1.pid" ]] && cat "$DIR/$1.pid"; }
alive() { local pid; pid="$(pid_of "$1")" && kill -0 "$pid" 2>/dev/null; }

install_packages() {
    local missing=()
    for cmd in munged slurmctld slurmd sbatch; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $EUID -eq 0 ]] || die "missing ${missing[*]}; run as root to install slurm-wlm and munge (apt-get)"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install SLURM and munge yourself"
    # No service may start from the packages' install scripts (they would use /etc and every
    # interface): a policy-rc.d that refuses, for the time of the install only.
    local policy=/usr/sbin/policy-rc.d added_policy=""
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
    fi
    local log="$DIR/apt.log" ok=1
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >"$log" 2>&1; then
        apt-get update -q >>"$log" 2>&1 || true
        apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$log" 2>&1 || ok=0
    fi
    [[ -n $added_policy ]] && rm -f "$policy"
    [[ $ok -eq 1 ]] || die "apt-get install slurm-wlm munge failed; see $log"
}

write_config() {
    local cpus mem_mb
    cpus="$(nproc)"
    mem_mb="$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"  # below what slurmd sees
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
    cat >"$CONF" <<EOF
# Written by sparsebench scripts/local_slurm.sh: one node, this machine, 127.0.0.1 only.
ClusterName=sparsebench
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits for its old credential to expire (default 120 s)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.daemon.pid
SlurmdPidFile=$DIR/slurmd.daemon.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
KillWait=30
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    [[ -s "$DIR/munge/munge.key" ]] || (umask 077 && head -c 1024 /dev/urandom >"$DIR/munge/munge.key")
    chmod 600 "$DIR/munge/munge.key"
}

resolve_host() {
    getent hosts "$HOST" >/dev/null && return 0
    [[ $EUID -eq 0 ]] || die "host name $HOST does not resolve; add '127.0.0.1 $HOST' to /etc/hosts"
    echo "127.0.0.1 $HOST $HOSTS_MARK" >>/etc/hosts
}

# start NAME LOG COMMAND...: run a daemon in the foreground of its own session; record its PID.
start_daemon() {
    local name="$1" log="$2"; shift 2
    setsid "$@" </dev/null >>"$log" 2>&1 &
    echo $! >"$DIR/$name.pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds="$1" what="$2"; shift 2
    for _ in $(seq $((seconds * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "$what did not come up within ${seconds} s; logs in $DIR"
}

node_idle() { SLURM_CONF="$CONF" sinfo -h -n "$HOST" -o %t | grep -qE '^(idle|mix|alloc)'; }

start() {
    mkdir -p "$DIR" && chmod 700 "$DIR"
    if alive munged && alive slurmctld && alive slurmd; then
        echo "export SLURM_CONF=$CONF  # local SLURM already running; state and logs in $DIR"
        return 0
    fi
    [[ $EUID -eq 0 ]] || die "run as root: slurmd starts the jobs, as root, on this one-node cluster"
    stop_daemons  # whatever is left of an earlier, partial start
    install_packages
    resolve_host
    write_config
    rm -rf "${DIR:?}/state/"* "${DIR:?}/spool/"*  # a fresh cluster: no jobs from an earlier start
    start_daemon munged "$DIR/munged.out" munged -F --force --socket="$DIR/munge/munge.socket" \
        --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munged.daemon.pid" \
        --seed-file="$DIR/munge/munged.seed" --log-file="$DIR/munged.log"
    wait_for 10 munged test -S "$DIR/munge/munge.socket"
    start_daemon slurmctld "$DIR/slurmctld.out" slurmctld -D -i -f "$CONF"
    wait_for 20 slurmctld env SLURM_CONF="$CONF" scontrol ping
    start_daemon slurmd "$DIR/slurmd.out" slurmd -D -f "$CONF"
    wait_for 30 "the node $HOST" node_idle
    echo "export SLURM_CONF=$CONF  # local SLURM on 127.0.0.1; state and logs in $DIR"
}

stop_daemons() {
    local name pid
    for name in slurmd slurmctld munged; do
        pid="$(pid_of "$name")" || continue
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/$name.pid"
    done
}

stop() {
    if alive slurmctld; then  # jobs' processes are not the daemons' children: cancel them first
        local jobs
        jobs="$(SLURM_CONF="$CONF" squeue -h -o %A 2>/dev/null || true)"
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            SLURM_CONF="$CONF" scancel --full --signal=KILL $jobs 2>/dev/null || true
            SLURM_CONF="$CONF" scancel $jobs 2>/dev/null || true
            for _ in $(seq 50); do
                [[ -z "$(SLURM_CONF="$CONF" squeue -h -o %A 2>/dev/null)" ]] && break; sleep 0.2
            done
        fi
    fi
    stop_daemons
    if [[ $EUID -eq 0 ]] && grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
        local kept; kept="$(grep -vF "$HOSTS_MARK" /etc/hosts)"; printf '%s\n' "$kept" >/etc/hosts
    fi
}

status() {
    local name
    for name in munged slurmctld slurmd; do
        if alive "$name"; then echo "$name: running, pid $(pid_of "$name")"; else echo "$name: not running"; fi
    done
    alive slurmctld && SLURM_CONF="$CONF" sinfo -N -o "%N %t %c" 2>/dev/null || true
    echo "state and logs: $DIR"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

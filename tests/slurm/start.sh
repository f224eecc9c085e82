#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/test_slurm.py: munge,
# slurmctld and slurmd from Debian's packages, talking over 127.0.0.1 only.
#
#   tests/slurm/start.sh [--install]   start it (--install: apt-get the packages first)
#   tests/slurm/start.sh stop          stop the daemons this script started
#
# The node has four "GPUs" backed by dummy device files, so that --gpus and --gres=gpu are
# granted and SLURM sets CUDA_VISIBLE_DEVICES and SLURM_JOB_GPUS as a real GPU node
# would; they are links to /dev/null, so nothing can compute on them. There is no slurmdbd, so there is no
# accounting and sacct cannot answer: a cluster without accounting. Memory and CPUs
# are not enforced (no cgroups, which containers often lack).
#
# The configuration goes where every SLURM command looks for it, /etc/slurm: the
# executor plugin runs each job's step with srun in an environment stripped of
# SLURM_* variables, SLURM_CONF included. A slurm.conf this script did not write is
# never replaced. State, logs and the dummy GPUs live in $STIMSYNTH_SLURM_DIR
# (default /tmp/stimsynth-slurm). Needs root: slurmd starts jobs as their user.
set -euo pipefail

DIR=${STIMSYNTH_SLURM_DIR:-/tmp/stimsynth-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# Written by tests/slurm/start.sh"
unset SLURM_CONF

stop() {
    local pid
    for daemon in slurmd slurmctld; do
        if [[ -f $DIR/$daemon.pid ]]; then
            pid=$(cat "$DIR/$daemon.pid")
            kill "$pid" 2>/dev/null || true
            # Gone before a new one starts on its port.
            for _ in $(seq 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.2
            done
            rm -f "$DIR/$daemon.pid"
        fi
    done
    # munged is stopped only if this script started it (another may serve a real
    # cluster on this machine).
    if [[ -f $DIR/munged.pid ]]; then
        kill "$(cat "$DIR/munged.pid")" 2>/dev/null || true
        rm -f "$DIR/munged.pid"
    fi
}

if [[ ${1:-} == stop ]]; then
    stop
    exit 0
fi

if [[ $(id -u) != 0 ]]; then
    echo "start.sh: must run as root (slurmd starts jobs as their user)" >&2
    exit 1
fi

if [[ ${1:-} == --install ]] && ! command -v slurmctld >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
fi
for tool in slurmctld slurmd sinfo munged; do
    command -v "$tool" >/dev/null || {
        echo "start.sh: $tool is not installed; run with --install" \
            "(Debian: slurmctld slurmd slurm-client munge)" >&2
        exit 1
    }
done

if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
    echo "start.sh: $CONF belongs to another SLURM; not replacing it" >&2
    exit 1
fi

# Already up (started earlier by this script, e.g. by .ci/run): nothing to do.
if [[ -f $CONF ]] && sinfo --noheader --responding --states=idle,mixed,allocated \
    2>/dev/null | grep -q .; then
    echo "SLURM is already running ($CONF)"
    exit 0
fi
stop

mkdir -p "$DIR"/{state,spool,log}

# munge authenticates every message between the SLURM commands and daemons.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile /etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 600 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 755 /run/munge
    runuser -u munge -- /usr/sbin/munged --pid-file /run/munge/stimsynth.pid
    cp /run/munge/stimsynth.pid "$DIR/munged.pid"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
fi

HOST=$(hostname -s)
# The node's memory as slurmd finds it. Its CPUs are overstated (config_overrides
# lets slurmd accept that): the test's jobs spend most of their time starting up
# and waiting to be polled, so more of them at once finish sooner, even on 2 cores.
MEMORY=$(slurmd -C | grep -o 'RealMemory=[0-9]*')
CPUS=$(( $(nproc) > 8 ? $(nproc) : 8 ))
# slurmd wants GPU device files to be character devices: links to /dev/null.
for gpu in 0 1 2 3; do
    ln -sfn /dev/null "$DIR/gpu$gpu"
done

mkdir -p /etc/slurm
cat >"$CONF" <<EOF
$MARKER: a one-node test cluster on 127.0.0.1.
ClusterName=stimsynth-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: processes are tracked by parentage and tasks are not confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: no accounting, so sacct has nothing to report.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
# Finished jobs stay visible to squeue this long; the executor plugin's squeue
# status checks need it well above its polling interval.
MinJobAge=300
SchedulerParameters=sched_interval=2
MessageTimeout=30
SlurmdParameters=config_overrides
NodeName=$HOST CPUs=$CPUS $MEMORY Gres=gpu:4 NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

cat >/etc/slurm/gres.conf <<EOF
NodeName=$HOST Name=gpu File=$DIR/gpu[0-3]
EOF

slurmctld
slurmd

# Up when the node answers and takes jobs.
for _ in $(seq 60); do
    if sinfo --noheader --responding --states=idle,mixed,allocated 2>/dev/null |
        grep -q .; then
        echo "SLURM is running ($CONF)"
        exit 0
    fi
    sleep 1
done
echo "start.sh: SLURM did not come up; its logs:" >&2
tail -n 30 "$DIR"/log/*.log >&2 || true
exit 1

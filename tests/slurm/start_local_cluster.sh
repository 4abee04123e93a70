#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (as root, Debian), for the opt-in SLURM tests:
#   bash tests/slurm/start_local_cluster.sh && VLHUB_SLURM_TESTS=1 python -m pytest tests/slurm/test_slurm.py
# Stop it with: kill $(cat /run/slurmd.pid) $(cat /run/slurmctld.pid) $(cat /run/munge/munged.pid)
set -euo pipefail
if ! command -v slurmctld >/dev/null; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
fi
if sinfo -h -o %t 2>/dev/null | grep -q idle; then exit 0; fi
mkdir -p /run/munge && chown munge:munge /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
chown slurm:slurm /var/spool/slurmctld /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
/usr/sbin/slurmctld
/usr/sbin/slurmd -N localhost
timeout 60 bash -c 'until sinfo -h -o %t | grep -q idle; do sleep 1; done'

#!/usr/bin/env bash
# Starts a single-node Slurm (Debian's slurmctld/slurmd/munge) on this machine, for CI and local testing of
# `snakemake --profile slurm`. Run as root. Idempotent: does nothing if `sinfo` already answers.
# Usage: slurm/local-cluster.sh [--install]
set -euo pipefail
if [[ "${1:-}" == "--install" ]] && ! command -v slurmctld >/dev/null; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
fi
for cmd in slurmctld slurmd munged sbatch squeue; do
  command -v "$cmd" >/dev/null || { echo "local-cluster: $cmd not installed (run with --install)" >&2; exit 2; }
done
if timeout 5 sinfo -h >/dev/null 2>&1; then echo "local-cluster: Slurm already answers"; exit 0; fi

# munge: key in a 0700 directory, socket in a separate 0755 directory
install -d -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -m 0755 /run/munge
[[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || munged --force --socket=/run/munge/munge.socket.2

# The jobstep plugin drops a custom SLURM_CONF from the job environment, so the config lives at the default path.
install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=/run/munge/munge.socket.2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=300
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
NodeName=localhost NodeHostname=$(hostname) NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=main Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld
slurmd -N localhost
for _ in $(seq 30); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed"; then echo "local-cluster: up ($cpus CPUs, $mem_mb MB)"; exit 0; fi
  sleep 1
done
echo "local-cluster: the node did not become idle; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1

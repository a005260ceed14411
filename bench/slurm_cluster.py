"""A one-node SLURM on this machine, for the fault campaign's preemption checks: Debian's slurm-wlm (slurmctld and
slurmd, 22.05) and munge on localhost, with proctrack/linuxproc and task/none (no cgroups, so it runs in a
container). Every file lives under one folder (``SLURM_CONF`` points there; /etc/slurm is not touched); it starts
in about a second and stops with the ``with`` block.

    apt-get install -y slurm-wlm munge     # ~11 s on Debian
"""
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

CONF = """ClusterName=campaign
SlurmctldHost={host}
AuthType=auth/munge
AuthInfo=socket={work}/munge.sock
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={work}/ctld
SlurmdSpoolDir={work}/d
SlurmctldPidFile={work}/slurmctld.pid
SlurmdPidFile={work}/slurmd.pid
SlurmctldLogFile={work}/slurmctld.log
SlurmdLogFile={work}/slurmd.log
SlurmctldPort={port}
SlurmdPort={port_d}
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
KillWait=30
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=campaign Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""


class SlurmCluster:
    """``with SlurmCluster(folder) as slurm:`` a running one-node cluster; ``slurm.env`` is the environment its
    commands (sbatch, scontrol, scancel) need."""

    def __init__(self, work: Path, port: int = 6917):
        self.work = Path(work).resolve()
        self.port = port
        self.env = {**os.environ, "SLURM_CONF": str(self.work / "slurm.conf")}
        self.daemons = []

    def __enter__(self):
        for sub in ("ctld", "d"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        (self.work / "slurm.conf").write_text(CONF.format(
            host=socket.gethostname(), work=self.work, user=os.environ.get("USER", "root"), port=self.port,
            port_d=self.port + 1, cpus=os.cpu_count()))
        subprocess.run(["munged", "--force", f"--socket={self.work}/munge.sock", f"--pid-file={self.work}/munged.pid",
                        f"--log-file={self.work}/munged.log", f"--seed-file={self.work}/munge.seed"], check=True)
        for daemon in ("slurmctld", "slurmd"):
            with open(self.work / f"{daemon}.out", "w") as out:
                self.daemons.append(subprocess.Popen([daemon, "-D"], env=self.env, stdout=out, stderr=out))
        self.wait_for(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T"), 30, "the node to be idle")
        return self

    def __exit__(self, *exc):
        for daemon in self.daemons:
            daemon.terminate()
            daemon.wait(timeout=30)
        pid = (self.work / "munged.pid").read_text().strip()
        os.kill(int(pid), signal.SIGTERM)

    def run(self, *cmd) -> str:
        return subprocess.run(cmd, env=self.env, check=True, capture_output=True, text=True).stdout

    def submit(self, script: str, *sbatch_args: str, env=None) -> int:
        """sbatch of a ``#!/bin/bash`` script text; its job id."""
        done = subprocess.run(["sbatch", "--parsable", *sbatch_args], input=script, env={**self.env, **(env or {})},
                              check=True, capture_output=True, text=True)
        return int(done.stdout.strip().split(";")[0])

    def job(self, job: int) -> dict:
        """scontrol's fields of a job (JobState, Restarts, Reason, ExitCode, ...)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", "-o", str(job))))

    def wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"SLURM: waited {timeout:.0f} s for {what}")
            time.sleep(0.2)

    def wait_state(self, job: int, states, timeout: float = 900) -> dict:
        self.wait_for(lambda: self.job(job)["JobState"] in states, timeout, f"job {job} to be {'/'.join(states)}")
        return self.job(job)

    def start_now(self, job: int) -> None:
        """A requeued job waits in BeginTime (SLURM holds it ~2 minutes): start it now. Not in the second its
        previous run was killed: slurmd revokes that run's credential with a time in whole seconds and refuses a
        new one of the same second ("Job credential revoked": the job fails, seen on a loaded machine)."""
        time.sleep(2)
        self.run("scontrol", "update", f"JobId={job}", "StartTime=now")

    def signal(self, job: int, name: str) -> None:
        """``scancel --signal`` to every process of the job's steps (train.py, its ranks and their loader workers),
        as SLURM's ``--signal=USR1@N`` or a drained node's SIGTERM reach them."""
        self.run("scancel", f"--signal={name}", str(job))

"""What the launcher says about the job, read from torch.distributed.run's or SLURM's variables, the way
Lightning's cluster environments read them (torchrun first: it can also run inside a SLURM job), and the
cluster environment Lightning is given for it."""
import os
import re
import warnings
from typing import Mapping, Optional

from pytorch_lightning.plugins.environments import (ClusterEnvironment, LightningEnvironment, SLURMEnvironment,
                                                    TorchElasticEnvironment)

# Lightning's warning whenever `srun` is on the PATH and the process is not an srun task (at every Trainer and fit).
SRUN_HINT = "The `srun` command is available on your system but is not used"


def _torchrun(env: Mapping[str, str]) -> bool:
    return "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env


def _srun(env: Mapping[str, str]) -> bool:
    """A task of an srun step (srun sets SLURM_STEP_ID; an sbatch script itself has SLURM_NTASKS too, which
    Lightning took for srun), not in a job named bash / interactive (salloc shells, as Lightning)."""
    return ("SLURM_NTASKS" in env and "SLURM_STEP_ID" in env
            and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"))


def _int(text: Optional[str]) -> Optional[int]:
    """SLURM counts, e.g. '2' or '8(x2)' (the count before a repeat suffix)."""
    match = re.match(r"\d+", text or "")
    return int(match.group()) if match else None


def default_num_nodes(env: Mapping[str, str] = os.environ) -> int:
    """Machines in this job: torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE; under srun SLURM_NNODES (or
    SLURM_JOB_NUM_NODES, or SLURM_NTASKS / SLURM_NTASKS_PER_NODE); else 1."""
    if _torchrun(env):
        return max(1, int(env["WORLD_SIZE"]) // max(1, int(env["LOCAL_WORLD_SIZE"])))
    if _srun(env):
        nodes = _int(env.get("SLURM_NNODES")) or _int(env.get("SLURM_JOB_NUM_NODES"))
        if nodes:
            return nodes
        tasks, per_node = _int(env.get("SLURM_NTASKS")), _int(env.get("SLURM_NTASKS_PER_NODE"))
        if tasks and per_node:
            return max(1, -(-tasks // per_node))
    return 1


def launched_processes(env: Mapping[str, str] = os.environ) -> int:
    """Processes the launcher started for this job (1 when run plainly)."""
    if _torchrun(env):
        return int(env["WORLD_SIZE"])
    if _srun(env):
        return _int(env.get("SLURM_NTASKS")) or 1
    return 1


def cluster_environment(env: Mapping[str, str] = os.environ) -> ClusterEnvironment:
    """The Trainer's cluster environment, chosen here rather than by Lightning's detection: torchrun's, an srun
    task's (without Lightning's auto-requeue), else Lightning's own (it starts the processes). Lightning's "srun
    is available but not used" hint is then wrong, and it comes at every fit: it is silenced (only it), so runs
    and tests pass on SLURM login nodes."""
    warnings.filterwarnings("ignore", message=re.escape(SRUN_HINT))
    if _torchrun(env):
        return TorchElasticEnvironment()
    if _srun(env):
        return SLURMEnvironment(auto_requeue=False)
    return LightningEnvironment()

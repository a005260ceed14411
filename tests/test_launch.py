"""utils/launch.py: the node count and process count that torchrun and srun announce."""
import pytest

from utils.launch import default_num_nodes, launched_processes

TORCHRUN_2x8 = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "RANK": "9", "LOCAL_RANK": "1", "GROUP_RANK": "1"}
SRUN_2x8 = {"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "hubert"}


@pytest.mark.parametrize("env, nodes, processes", [
    ({}, 1, 1),
    (TORCHRUN_2x8, 2, 16),
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, 1, 8),
    (SRUN_2x8, 2, 16),
    ({**SRUN_2x8, "SLURM_NNODES": "", "SLURM_JOB_NUM_NODES": "4"}, 4, 16),  # allocation size as a fallback
    ({"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8(x2)"}, 2, 16),  # only the task counts
    ({**SRUN_2x8, **TORCHRUN_2x8, "SLURM_NTASKS": "2", "SLURM_NNODES": "2"}, 2, 16),  # srun starts torchrun per node
    ({**SRUN_2x8, "SLURM_JOB_NAME": "interactive"}, 1, 1),  # salloc shells: Lightning ignores SLURM, so do we
    ({"SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NAME": "hubert"}, 1, 1),  # inside sbatch but not under srun
])
def test_nodes_and_processes_from_the_launcher(env, nodes, processes):
    assert default_num_nodes(env) == nodes
    assert launched_processes(env) == processes

"""utils/launch.py: the node count and process count that torchrun and srun announce, and the cluster
environment Lightning gets, with `srun` on the PATH (every SLURM login node) and without."""
import os

import pytest
from pytorch_lightning.plugins.environments import LightningEnvironment, SLURMEnvironment, TorchElasticEnvironment

import train
from tests.fixtures import make_prepared_dataset
from utils.launch import cluster_environment, default_num_nodes, launched_processes

TORCHRUN_2x8 = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "RANK": "9", "LOCAL_RANK": "1", "GROUP_RANK": "1"}
SRUN_2x8 = {"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "hubert",
            "SLURM_STEP_ID": "0"}


@pytest.mark.parametrize("env, nodes, processes", [
    ({}, 1, 1),
    (TORCHRUN_2x8, 2, 16),
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, 1, 8),
    (SRUN_2x8, 2, 16),
    ({**SRUN_2x8, "SLURM_NNODES": "", "SLURM_JOB_NUM_NODES": "4"}, 4, 16),  # allocation size as a fallback
    ({"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_STEP_ID": "3"}, 2, 16),  # only the task counts
    ({**SRUN_2x8, **TORCHRUN_2x8, "SLURM_NTASKS": "2", "SLURM_NNODES": "2"}, 2, 16),  # srun starts torchrun per node
    ({**SRUN_2x8, "SLURM_JOB_NAME": "interactive"}, 1, 1),  # salloc shells: Lightning ignores SLURM, so do we
    ({"SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NAME": "hubert"}, 1, 1),  # inside sbatch but not under srun
    ({k: v for k, v in SRUN_2x8.items() if k != "SLURM_STEP_ID"}, 1, 1),  # an sbatch --ntasks script, before srun
])
def test_nodes_and_processes_from_the_launcher(env, nodes, processes):
    assert default_num_nodes(env) == nodes
    assert launched_processes(env) == processes


@pytest.mark.parametrize("env, chosen", [({}, LightningEnvironment), (TORCHRUN_2x8, TorchElasticEnvironment),
                                         ({**SRUN_2x8, **TORCHRUN_2x8}, TorchElasticEnvironment)])
def test_cluster_environment_follows_the_launcher(env, chosen):
    assert type(cluster_environment(env)) is chosen


SRUN_TASK = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "hubert",
             "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_JOB_ID": "7", "SLURM_NODELIST": "localhost"}


@pytest.mark.parametrize("slurm, chosen", [({}, LightningEnvironment), (SRUN_TASK, SLURMEnvironment)],
                         ids=["outside_srun", "srun_task"])
def test_a_run_with_srun_on_the_path_passes_without_warnings(tmp_path, monkeypatch, slurm, chosen):
    """A real Trainer run (warnings are errors here) with an `srun` on the PATH: Lightning warned that it "is
    available on your system but is not used", failing 28 tests on SLURM machines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    data = make_prepared_dataset(tmp_path / "d", n_train=3, n_valid=1)
    trainer, _ = train.main(["--dataset-path", str(data), "--exp-dir", str(tmp_path / "exp"), "--feature-type",
                             "mfcc", "--num-classes", "10", "--model-name", "hubert_pretrain_tiny", "--num-workers",
                             "0", "--log-every-n-steps", "1", "--max-updates", "2", "--warmup-updates", "1"])
    assert trainer.global_step == 2
    environment = trainer._accelerator_connector.cluster_environment
    assert type(environment) is chosen and not getattr(environment, "auto_requeue", False)

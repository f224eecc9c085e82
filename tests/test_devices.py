"""Jobs sharing a machine's GPUs each claim their own; no GPU is needed to test it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from stimsynth import devices, runner

# Claims are held by processes, so each claimant is a process of its own: it claims
# a GPU, prints what it got, and holds it until its standard input closes.
CLAIMANT = """
import sys
from stimsynth.devices import claim_gpu
from stimsynth.runner import DeviceError
print(claim_gpu(int(sys.argv[1]), lock_dir=sys.argv[2]), flush=True)
sys.stdin.read()
"""


class Claimants:
    """Processes that each claim a GPU and hold it until told to stop."""

    def __init__(self, lock_dir):
        self.lock_dir = lock_dir
        self.processes = []

    def start(self, count, visible=None):
        env = {**os.environ}
        env.pop("CUDA_VISIBLE_DEVICES", None)
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        process = subprocess.Popen(
            [sys.executable, "-c", CLAIMANT, str(count), str(self.lock_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.processes.append(process)
        return process

    def claim(self, count, visible=None):
        """The index a new claimant got, or None."""
        answer = self.start(count, visible).stdout.readline().strip()
        return None if answer == "None" else int(answer)

    def stop(self):
        for process in self.processes:
            process.stdin.close()
            process.wait(30)


@pytest.fixture
def claimants(tmp_path):
    group = Claimants(tmp_path)
    yield group
    group.stop()


@pytest.fixture(autouse=True)
def no_claim_held():
    devices.release_gpu()
    yield
    devices.release_gpu()


def test_concurrent_jobs_claim_distinct_gpus_until_none_is_left(claimants):
    assert claimants.claim(2) == 0
    assert claimants.claim(2) == 1
    assert claimants.claim(2) is None


def test_a_gpu_comes_free_when_its_job_ends(claimants):
    first = claimants.start(1)
    assert first.stdout.readline().strip() == "0"
    assert devices.claim_gpu(1, lock_dir=claimants.lock_dir) is None
    # However the job ends, even killed, the kernel drops its lock.
    first.kill()
    first.wait(30)
    assert devices.claim_gpu(1, lock_dir=claimants.lock_dir) == 0


def test_locks_follow_cuda_visible_devices_not_torch_indices(claimants):
    # A job that sees GPUs 3 and 5 claims 3, as torch's cuda:0; a job that sees
    # only GPU 3 then finds it taken, and one that sees only 5 gets it as cuda:0.
    assert claimants.claim(2, visible="3,5") == 0
    assert claimants.claim(1, visible="3") is None
    assert claimants.claim(1, visible="5") == 0


def test_a_process_keeps_the_gpu_it_claimed(tmp_path):
    assert devices.claim_gpu(2, lock_dir=tmp_path) == 0
    assert devices.claim_gpu(2, lock_dir=tmp_path) == 0
    assert devices.claimed_gpu().path == tmp_path / "gpu-0.lock"
    devices.release_gpu()
    assert devices.claimed_gpu() is None


def test_waiting_for_a_gpu_gives_up_at_its_timeout(claimants):
    assert claimants.claim(1) == 0
    index = devices.claim_gpu(
        1, lock_dir=claimants.lock_dir, wait=True, timeout=0.3, poll_s=0.1
    )
    assert index is None


def test_the_lock_folder_is_shared_and_can_be_set(tmp_path, monkeypatch):
    monkeypatch.setenv(devices.LOCK_DIR_VARIABLE, str(tmp_path / "locks"))
    assert devices.claim_gpu(1) == 0
    assert (tmp_path / "locks" / "gpu-0.lock").exists()
    assert (tmp_path / "locks").stat().st_mode & 0o1777 == 0o1777


@pytest.mark.parametrize(
    ("environ", "gpuless"),
    [
        ({}, False),
        ({"SLURM_JOB_ID": "7"}, True),
        ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "0"}, True),
        ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "1"}, False),
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_GPUS": "0,1"}, False),
        ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "1"}, False),
    ],
)
def test_a_slurm_job_without_a_granted_gpu_is_recognised(environ, gpuless):
    assert devices.in_gpuless_slurm_job(environ) is gpuless


def _no_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", *devices.SCHEDULER_GPU_VARIABLES):
        monkeypatch.delenv(name, raising=False)


def test_auto_runs_on_the_cpu_without_a_gpu(monkeypatch, caplog):
    _no_slurm(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.set_level("INFO", logger="stimsynth.runner")
    assert runner.select_device("auto") == torch.device("cpu")
    assert runner.select_device("cpu") == torch.device("cpu")
    assert "this job sees no GPU" in caplog.text


def test_cuda_without_a_gpu_says_why(monkeypatch):
    _no_slurm(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        runner.DeviceError, match="asks for cuda but this job sees no GPU"
    ):
        runner.select_device("cuda")


def test_a_granted_gpu_that_torch_cannot_see_is_logged(monkeypatch, caplog):
    _no_slurm(monkeypatch)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_GPUS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.set_level("INFO", logger="stimsynth.runner")
    assert runner.select_device("auto") == torch.device("cpu")
    assert "GPUs assigned to this job: CUDA_VISIBLE_DEVICES=1" in caplog.text
    with pytest.raises(runner.DeviceError, match="torch sees none"):
        runner.select_device("cuda")


def test_jobs_on_a_gpu_machine_get_distinct_gpus(monkeypatch, tmp_path, claimants):
    # Pretend torch sees two GPUs; another job already holds the first.
    _no_slurm(monkeypatch)
    monkeypatch.setenv(devices.LOCK_DIR_VARIABLE, str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert claimants.claim(2) == 0
    assert runner.select_device("cuda") == torch.device("cuda", 1)
    assert chosen == [1]


def test_auto_falls_back_to_the_cpu_when_every_gpu_is_claimed(
    monkeypatch, tmp_path, claimants
):
    _no_slurm(monkeypatch)
    monkeypatch.setenv(devices.LOCK_DIR_VARIABLE, str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert claimants.claim(1) == 0
    assert runner.select_device("auto") == torch.device("cpu")


def test_a_slurm_job_granted_no_gpu_leaves_the_node_s_gpus_alone(monkeypatch):
    _no_slurm(monkeypatch)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert runner.select_device("auto") == torch.device("cpu")
    with pytest.raises(runner.DeviceError, match="granted no GPU"):
        runner.select_device("cuda")

"""What the rules ask a scheduler for, and the tiny study run by a real SLURM.

The SLURM test runs the study of test_workflow.py through snakemake-executor-plugin-
slurm and profiles/slurm on the one-node cluster of tests/slurm/start.sh: no
accounting database (so sacct cannot answer) and two dummy GPUs, granted like real
ones but unusable, so that synthesis jobs given a GPU fall back to the CPU and say
in their logs what they were given. The test starts that cluster when it is not
running and this is root; in CI (CI or STIMSYNTH_REQUIRE_SLURM=1 set) it fails
when the cluster cannot be reached, elsewhere it is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stimsynth.config import load_config, plan_study
from stimsynth.store import open_run
from test_workflow import TINY

REPO = Path(__file__).resolve().parents[1]
START = REPO / "tests" / "slurm" / "start.sh"
SLURM_CONF = Path("/etc/slurm/slurm.conf")
SLURM_LOGS = Path(os.environ.get("STIMSYNTH_SLURM_DIR", "/tmp/stimsynth-slurm")) / "log"
REQUIRED = (
    bool(os.environ.get("CI")) or os.environ.get("STIMSYNTH_REQUIRE_SLURM") == "1"
)
# The tiny study of test_workflow.py without its texture model (the slowest to
# build and check): every method still runs, in 12 jobs rather than 16.
SLURM_STUDY = {
    **TINY,
    "images": {name: TINY["images"][name] for name in ("einstein", "curie")},
    "models": {"onoff": TINY["models"]["onoff"]},
    "metamer": {"frontend": TINY["metamer"]["frontend"]},
}
SYNTHESIS_RULES = [
    f"synthesize_{method}"
    for method in ("metamer", "mad", "eigendistortion", "geodesic")
]


def dry_run_resources(workdir: Path, config: dict) -> dict[str, dict[str, str]]:
    """Resources of each synthesis job of a dry run, by its wildcards."""
    (workdir / "study.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [
            *(sys.executable, "-m", "snakemake"),
            *("--snakefile", str(REPO / "Snakefile")),
            *("--directory", str(workdir)),
            *("--configfile", str(workdir / "study.yaml")),
            *("--cores", "2", "--dry-run"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {}
    rule = run = None
    for line in result.stdout.splitlines():
        line = line.strip()
        if line.startswith("rule "):
            rule = line.removeprefix("rule ").rstrip(":")
        elif line.startswith("wildcards: run="):
            run = line.removeprefix("wildcards: run=")
        elif line.startswith("resources:") and rule in SYNTHESIS_RULES:
            pairs = line.removeprefix("resources:").split(",")
            jobs[f"{rule}/{run}"] = dict(pair.strip().split("=", 1) for pair in pairs)
    return jobs


def test_synthesis_memory_follows_image_size_model_and_method(tmp_path):
    small = dry_run_resources(tmp_path, TINY)
    assert len(small) == 6
    assert {job["gpu"] for job in small.values()} == {"0"}
    assert {job["runtime"] for job in small.values()} == {"120"}
    mem = {job: int(resources["mem_mb"]) for job, resources in small.items()}
    assert min(mem.values()) >= 1000

    large = {
        **TINY,
        "images": {
            name: {**entry, "size": [512, 512], "fit": "resize"}
            for name, entry in TINY["images"].items()
        },
        "device": "cuda",
    }
    big = dry_run_resources(tmp_path, large)
    assert {job["gpu"] for job in big.values()} == {"1"}
    big_mem = {job: int(resources["mem_mb"]) for job, resources in big.items()}
    for job in mem:
        assert big_mem[job] > mem[job], job
    # The texture model holds more per pixel than the front end, and a geodesic
    # holds every frame of its path.
    texture = big_mem["synthesize_metamer/texture/skin/seed0"]
    frontend = big_mem["synthesize_metamer/frontend/einstein/seed0"]
    geodesic = big_mem["synthesize_geodesic/shift/einstein/seed0"]
    assert texture > frontend
    assert geodesic > frontend


# The SLURM cluster ------------------------------------------------------------------


def slurm_env() -> dict[str, str]:
    """Environment for SLURM commands aimed at the test cluster."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # The test cluster's config is the one in /etc/slurm; a test run inside a SLURM
    # job submits as from a login node.
    for name in list(env):
        if name.startswith("SLURM_"):
            del env[name]
    return env


def is_test_cluster() -> bool:
    """Whether this machine's SLURM config is the test cluster's."""
    return SLURM_CONF.exists() and "tests/slurm/start.sh" in SLURM_CONF.read_text()


def cluster_answers(env: dict[str, str]) -> bool:
    if not shutil.which("sinfo") or not is_test_cluster():
        return False
    result = subprocess.run(
        ["sinfo", "--noheader", "--responding", "--states=idle,mixed,allocated"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    return result.returncode == 0 and bool(result.stdout.strip())


def unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"SLURM is required here (CI or STIMSYNTH_REQUIRE_SLURM): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """Environment for SLURM commands, once the test cluster answers."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        unavailable(
            "snakemake-executor-plugin-slurm is not installed "
            "(pip install -e '.[test]')"
        )
    env = slurm_env()
    if SLURM_CONF.exists() and not is_test_cluster():
        unavailable(f"{SLURM_CONF} is another cluster's; the test runs on its own")
    if not cluster_answers(env):
        if os.geteuid() != 0 or not shutil.which("slurmctld"):
            unavailable(
                "no test SLURM cluster is running and this test cannot start one: "
                "it needs root and Debian's slurmctld, slurmd, slurm-client and "
                "munge (sudo tests/slurm/start.sh --install)"
            )
        started = subprocess.run(
            [str(START)], capture_output=True, text=True, env=env, timeout=180
        )
        if started.returncode != 0:
            unavailable(f"tests/slurm/start.sh failed:\n{started.stderr[-3000:]}")
    if not cluster_answers(env):
        unavailable(f"the test SLURM cluster does not answer (its logs: {SLURM_LOGS})")
    return env


def run_snakemake(command: list[str], env: dict[str, str], timeout: float):
    """Run snakemake; past ``timeout``, interrupt it so that it cancels its jobs."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"snakemake took over {timeout} s on SLURM:\n{stderr[-5000:]}")
    return process.returncode, stdout, stderr


def slurm_jobs(env: dict[str, str], run_name: str) -> list[dict[str, str]]:
    """The jobs of one snakemake run that SLURM still knows (for MinJobAge)."""
    shown = subprocess.run(
        ["scontrol", "show", "job", "--oneliner"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    ).stdout
    jobs = []
    for line in shown.splitlines():
        fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
        if fields.get("JobName") == run_name:
            jobs.append(fields)
    return jobs


@pytest.fixture(scope="module")
def slurm_study(slurm, tmp_path_factory):
    """The tiny study run through SLURM: its folder, its output and SLURM's jobs."""
    workdir = tmp_path_factory.mktemp("slurm_study")
    (workdir / "study.yaml").write_text(yaml.safe_dump(SLURM_STUDY))
    # The project's profile as a site would use it, plus one line: synthesis asks
    # for a GPU although the study says device: auto.
    profile = yaml.safe_load((REPO / "profiles/slurm/config.v9+.yaml").read_text())
    profile["set-resources"] = {rule: {"gpu": 1} for rule in SYNTHESIS_RULES}
    (workdir / "profile").mkdir()
    (workdir / "profile/config.v9+.yaml").write_text(yaml.safe_dump(profile))
    command = [
        *(sys.executable, "-m", "snakemake"),
        *("--snakefile", str(REPO / "Snakefile")),
        *("--directory", str(workdir)),
        *("--configfile", str(workdir / "study.yaml")),
        *("--workflow-profile", str(workdir / "profile")),
        # Poll often: the test's jobs last seconds, a real cluster's minutes.
        *("--slurm-init-seconds-before-status-checks", "2"),
        *("--seconds-between-status-checks", "2"),
        "--slurm-keep-successful-logs",
        # The runs and their audit; the figures would add jobs, not coverage.
        "results/audit.csv",
    ]
    returncode, stdout, stderr = run_snakemake(command, slurm, timeout=480)
    assert returncode == 0, stderr[-6000:]
    run_name = re.search(r"SLURM run ID: (\S+)", stdout + stderr)
    assert run_name, "the SLURM executor did not run"
    return workdir, stdout + stderr, slurm_jobs(slurm, run_name.group(1))


def test_the_study_runs_on_slurm_and_every_store_opens(slurm_study):
    workdir, _, _ = slurm_study
    runs = plan_study(load_config(workdir / "study.yaml")).runs
    for run_id in runs:
        store = open_run(workdir / "results" / "runs" / f"{run_id}.zarr")
        assert store.attrs["run_id"] == run_id
        assert store.attrs["status"] in ("converged", "max_iter")
        # The GPUs SLURM grants here are dummies that torch cannot see.
        assert store.attrs["device"] == "cpu"
    assert len(runs) == 5
    table = pd.read_csv(workdir / "results" / "audit.csv")
    assert sorted(table["run_id"]) == sorted(runs)


def test_status_comes_from_squeue_on_a_cluster_without_accounting(slurm, slurm_study):
    sacct = subprocess.run(["sacct"], capture_output=True, text=True, env=slurm)
    assert sacct.returncode != 0  # the test cluster has no accounting database
    _, output, _ = slurm_study
    assert "Falling back to 'sacct'" not in output


def test_synthesis_jobs_were_granted_a_gpu_and_said_so(slurm_study):
    workdir, _, jobs = slurm_study
    runs = plan_study(load_config(workdir / "study.yaml")).runs
    for run_id in runs:
        log = (workdir / "results" / "logs" / "runs" / f"{run_id}.log").read_text()
        # SLURM_STEP_GPUS: the job runs as a step (srun) of its allocation.
        assert re.search(r"GPUs assigned to this job: .*SLURM_STEP_GPUS=\d", log), log
        assert "GPUs are assigned to this job but torch sees none" in log

    # SLURM's own view, while it still remembers the jobs: synthesis jobs asked
    # for a GPU (and ran, so got one), a CPU and the memory their rule estimated;
    # other jobs asked for no GPU.
    rules = {
        job["Comment"].removeprefix("rule_").split("_wildcards_")[0]: job
        for job in jobs
    }
    assert set(SYNTHESIS_RULES) <= set(rules), "SLURM no longer shows every job"
    for rule, job in rules.items():
        if rule in SYNTHESIS_RULES:
            assert job.get("TresPerJob") == "gres:gpu:1", job
            assert "cpu=1," in job["TRES"], job
            assert "mem=1100M" in job["TRES"], job
        else:
            assert "gpu" not in job.get("TresPerJob", ""), job


def test_a_job_cancelled_by_the_scheduler_resumes_from_its_checkpoint(
    slurm, slurm_study, tmp_path
):
    """scancel a synthesis job mid-run: snakemake's retry resubmits it, and the run
    goes on from its checkpoint rather than from the start."""
    finished, _, _ = slurm_study
    workdir = tmp_path / "study"
    shutil.copytree(finished, workdir, symlinks=True)
    study = yaml.safe_load((workdir / "study.yaml").read_text())
    study["checkpoint_every"] = 32
    study["metamer"]["frontend"].update(
        {"max_iter": 1500, "stop": {"window": 100000}, "seeds": [0]}
    )
    (workdir / "study.yaml").write_text(yaml.safe_dump(study))
    run_id = "metamer/frontend/einstein/seed0"
    checkpoint = workdir / "results" / ".partial" / f"{run_id}.checkpoint"
    command = [
        *(sys.executable, "-m", "snakemake"),
        *("--snakefile", str(REPO / "Snakefile")),
        *("--directory", str(workdir)),
        *("--configfile", str(workdir / "study.yaml")),
        *("--workflow-profile", str(finished / "profile")),
        *("--slurm-init-seconds-before-status-checks", "2"),
        *("--seconds-between-status-checks", "2"),
        f"results/runs/{run_id}.zarr",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=slurm
    )
    cancelled = None
    deadline = time.monotonic() + 240
    while cancelled is None and time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if checkpoint.exists():
            queue = subprocess.run(
                ["squeue", "--noheader", "--format=%i %k"],
                capture_output=True,
                text=True,
                env=slurm,
                timeout=30,
            ).stdout
            for line in queue.splitlines():
                job, _, comment = line.partition(" ")
                if "synthesize_metamer" in comment:
                    subprocess.run(["scancel", job], env=slurm, timeout=30, check=True)
                    cancelled = job
        time.sleep(0.2)
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"snakemake did not finish after the cancel:\n{output[-5000:]}")
    assert cancelled, f"the synthesis job was never seen running:\n{output[-3000:]}"
    assert process.returncode == 0, output[-6000:]
    store = open_run(workdir / "results" / "runs" / f"{run_id}.zarr")
    resumed_at = json.loads(store.attrs["resumed_at"])
    assert resumed_at and resumed_at[0] % 32 == 0 and resumed_at[0] > 0, resumed_at
    assert store.sizes["iteration"] == 1500
    assert (store["iteration"].values == range(1500)).all()

# Shared helpers: the plan of the study and the paths of what each run reads.
import json
import math
import os
import re
import sys

from snakemake.exceptions import WorkflowError

from stimsynth.config import plan_study, validate_config
from stimsynth.errors import InputError

# The config is checked against workflow/schemas/config.schema.yaml (which also
# fills in defaults), for consistency, and against the files and code it names,
# before any job is created.
try:
    config.update(
        validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))
    )
    STUDY = plan_study(config)
except InputError as error:
    raise WorkflowError(f"The study config cannot run: {error}") from None
for _warning in STUDY.warnings:
    print(f"stimsynth: warning: {_warning}", file=sys.stderr)

RESULTS = config["results"]
# Where envs/stimsynth.yaml installs stimsynth from, for --software-deployment-method
# conda.
os.environ.setdefault("STIMSYNTH_SOURCE", workflow.basedir)
METHODS = ("metamer", "mad", "eigendistortion", "geodesic")


wildcard_constraints:
    image="|".join(map(re.escape, config["images"])) or "(?!)",
    model="|".join(map(re.escape, config["models"])) or "(?!)",
    metric="|".join(map(re.escape, config["metrics"])) or "(?!)",


def run_spec(method, run):
    """The spec of run ``{method}/{run}``."""
    return STUDY.runs[f"{method}/{run}"]


def run_pattern(method):
    """A regular expression matching exactly the runs of one method."""
    prefix = f"{method}/"
    runs = [rid[len(prefix) :] for rid in STUDY.runs_of(method)]
    return "|".join(map(re.escape, runs)) or "(?!)"


def run_inputs(method):
    """Input function: the prepared images, and the pinned model or the metrics,
    checked on each of those images."""

    def inputs(wildcards):
        spec = run_spec(method, wildcards.run)
        paths = {
            f"image_{name}": f"{RESULTS}/images/{name}.zarr" for name in spec["images"]
        }
        if "model" in spec["settings"]:
            model = spec["settings"]["model"]
            paths["model"] = f"{RESULTS}/models/{model}.pt"
            checked = [f"models/{model}/{image}" for image in spec["images"]]
        else:
            checked = [
                f"metrics/{metric}/{image}"
                for metric in spec["metrics"]
                for image in spec["images"]
            ]
        paths["checks"] = [f"{RESULTS}/checks/{path}.json" for path in checked]
        return paths

    return inputs


def run_params(method):
    """Params function: the run spec as JSON, so a changed spec reruns the run."""

    def params(wildcards):
        return json.dumps(run_spec(method, wildcards.run), sort_keys=True)

    return params


# Host memory of a synthesis job, estimated from CPU runs' peak RSS: about 450 MB
# for Python, torch, plenoptic and Zarr (the CUDA runtime adds a few hundred more),
# plus memory that grows with the pixels a run holds. Per megapixel of image that
# passes through the model at once (with autograd and Adam's state), about:
MODEL_MB_PER_MEGAPIXEL = {"PortillaSimoncelli": 2000}
OTHER_MODEL_MB_PER_MEGAPIXEL = 500  # OnOff and other front-end models
METRIC_MB_PER_MEGAPIXEL = 400  # a MAD direction under both metrics
BASE_MB = 1000


def synthesis_mem_mb(method):
    """Resource function: memory (MB) for a run of ``method``, from its image size,
    model and method, doubled on every retry (a job killed for memory gets more)."""

    def mem_mb(wildcards, attempt):
        spec = run_spec(method, wildcards.run)
        settings = spec["settings"]
        image = spec["images"][spec["image"]]
        height, width = image["size"]
        channels = 3 if image.get("color") else 1
        megapixels = height * width * channels / 1e6
        if spec["dtype"] == "float64":
            megapixels *= 2
        target = spec.get("model", {}).get("target", "")
        per_image = next(
            (mb for name, mb in MODEL_MB_PER_MEGAPIXEL.items() if name in target),
            OTHER_MODEL_MB_PER_MEGAPIXEL,
        )
        extra = 0
        if method == "metamer":
            images = len(spec.get("seeds", [spec["seed"]]))
        elif method == "mad":
            images, per_image = 4, METRIC_MB_PER_MEGAPIXEL
        elif method == "geodesic":
            images = settings["n_steps"] + 1
        else:
            # Top and bottom blocks of k vectors; the exact method also holds the
            # Jacobian and the Fisher matrix, which it keeps within its budget.
            images = 2 * settings["k"]
            if settings["method"] == "exact":
                extra = settings["memory_budget_mb"]
        estimate = BASE_MB + per_image * images * megapixels + extra
        return math.ceil(estimate / 100) * 100 * 2 ** (attempt - 1)

    return mem_mb


# Escalation: runs that fail the audit go on for more iterations, round by round.
ESCALATED = ("metamer", "mad", "geodesic")
ROUNDS = config["escalation"]["rounds"]


def store_path(run_id, round_):
    """The store of run ``run_id`` after round ``round_`` (0: the first run)."""
    if round_ == 0:
        return f"{RESULTS}/runs/{run_id}.zarr"
    return f"{RESULTS}/rounds/{round_}/runs/{run_id}.zarr"


def final_state_path(run_id, round_):
    """Where a run keeps the state it ended with, for a later round to go on from."""
    return f"{RESULTS}/.states/{round_}/{run_id}.pt"


def continued_spec(run_id, round_):
    """The spec of round ``round_`` of a run: its own, with more iterations."""
    spec = json.loads(json.dumps(STUDY.runs[run_id]))
    base = spec["settings"]["max_iter"]
    more = math.ceil(config["escalation"]["more_iterations"] * base)
    spec["settings"]["max_iter"] = base + round_ * more
    spec["round"] = round_
    return spec


def sent_back(round_):
    """Runs the audit of round ``round_ - 1`` sent back for round ``round_``."""
    failed = checkpoints.audit_round.get(round=round_ - 1).output.failed
    with open(failed) as handle:
        return json.load(handle)


def latest_stores(round_):
    """Each run's latest store once round ``round_`` has run, by run id."""
    stores = {run_id: store_path(run_id, 0) for run_id in STUDY.runs}
    for earlier in range(1, round_ + 1):
        for run_id in sent_back(earlier):
            stores[run_id] = store_path(run_id, earlier)
    return stores

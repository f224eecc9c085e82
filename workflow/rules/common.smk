# Shared helpers: the plan of the study and the paths of what each run reads.
import json
import re

from snakemake.exceptions import WorkflowError

from stimsynth.config import ConfigError, plan_study
from stimsynth.synthesis import ENGINE_VERSION

try:
    STUDY = plan_study(config)
except ConfigError as error:
    raise WorkflowError(f"The study config cannot run: {error}") from None

RESULTS = config["results"]
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
    """Input function: the prepared images and the pinned model or checked metrics."""

    def inputs(wildcards):
        spec = run_spec(method, wildcards.run)
        paths = {
            f"image_{name}": f"{RESULTS}/images/{name}.zarr" for name in spec["images"]
        }
        if "model" in spec["settings"]:
            paths["model"] = f"{RESULTS}/models/{spec['settings']['model']}.pt"
        else:
            for name in spec["metrics"]:
                paths[f"metric_{name}"] = f"{RESULTS}/models/{name}.json"
        return paths

    return inputs


def run_params(method):
    """Params function: the run spec as JSON, so a changed spec reruns the run."""

    def params(wildcards):
        return json.dumps(run_spec(method, wildcards.run), sort_keys=True)

    return params


def synthesis_mem_mb(wildcards, attempt):
    """Memory for a synthesis job, doubled on every retry."""
    return 4000 * 2 ** (attempt - 1)

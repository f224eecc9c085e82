# Shared helpers: the plan of the study and the paths of what each run reads.
import json
import re

from snakemake.exceptions import WorkflowError

from stimsynth.config import ConfigError, plan_study, validate_config

# The config is checked against workflow/schemas/config.schema.yaml (which also
# fills in defaults) and for consistency before any job is created.
try:
    config.update(
        validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))
    )
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


def synthesis_mem_mb(wildcards, attempt):
    """Memory for a synthesis job, doubled on every retry."""
    return 4000 * 2 ** (attempt - 1)

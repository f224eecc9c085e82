"""Run one synthesis and publish its store (thin entry point)."""

import json

from stimsynth.config import spec_hash
from stimsynth.logs import job_logging
from stimsynth.runner import execute_run

with job_logging(snakemake.log[0]):
    spec = json.loads(snakemake.params.spec)
    images = {name: snakemake.input[f"image_{name}"] for name in spec["images"]}
    execute_run(
        spec,
        images,
        store=snakemake.output.store,
        partial=snakemake.params.partial,
        model=snakemake.input.get("model"),
        # Read here rather than passed as a param: a param that changes with every
        # edit of the config would make Snakemake rerun every synthesis.
        config_hash=spec_hash(snakemake.config),
        threads=snakemake.threads,
        checkpoint_every=snakemake.config["checkpoint_every"],
        final_checkpoint=snakemake.params.final_state,
        continue_from=snakemake.params.continue_from,
    )

"""Build and pin one model of the study (thin entry point)."""

import json

from stimsynth.logs import job_logging
from stimsynth.models import prepare_model

with job_logging(snakemake.log[0]):
    report = prepare_model(
        snakemake.wildcards.model,
        json.loads(snakemake.params.entry),
        snakemake.params.image_shape,
        snakemake.output.pin,
    )
    with open(snakemake.output.report, "w") as handle:
        json.dump(report, handle, indent=2)

"""Check one metric of the study on one image (thin entry point)."""

import json

from stimsynth.logs import job_logging
from stimsynth.models import check_metric_entry

with job_logging(snakemake.log[0]):
    report = check_metric_entry(
        snakemake.wildcards.metric,
        json.loads(snakemake.params.entry),
        snakemake.input.image,
    )
    with open(snakemake.output.report, "w") as handle:
        json.dump(report, handle, indent=2)

"""Check a pinned model on one image of the study (thin entry point)."""

import json

from stimsynth.logs import job_logging
from stimsynth.models import check_pinned_model

with job_logging(snakemake.log[0]):
    report = check_pinned_model(snakemake.input.pin, snakemake.input.image)
    with open(snakemake.output.report, "w") as handle:
        json.dump(report, handle, indent=2)

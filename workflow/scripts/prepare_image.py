"""Prepare one image of the study (thin entry point; the work is in stimsynth)."""

import json

from stimsynth.images import prepare_image, save_image
from stimsynth.logs import job_logging

with job_logging(snakemake.log[0]):
    entry = json.loads(snakemake.params.entry)
    image = prepare_image(snakemake.wildcards.image, entry)
    save_image(image, snakemake.output.image)

"""Build and check one metric of the study (thin entry point)."""

import json

import torch

from stimsynth.images import open_image
from stimsynth.logs import job_logging
from stimsynth.models import prepare_metric

with job_logging(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    images = {
        name: torch.from_numpy(open_image(path).values)[None]
        for name, path in zip(
            snakemake.params.image_names, snakemake.input.images, strict=True
        )
    }
    report = prepare_metric(
        snakemake.wildcards.metric, json.loads(snakemake.params.entry), images
    )
    with open(snakemake.output.report, "w") as handle:
        json.dump(report, handle, indent=2)

"""Plot one run from its store (thin entry point)."""

from stimsynth.figures import save_run_figure

from stimsynth.logs import job_logging

with job_logging(snakemake.log[0]):
    save_run_figure(snakemake.input.store, snakemake.output.figure)

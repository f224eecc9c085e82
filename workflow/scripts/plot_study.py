"""Plot the study overview from the audit table and the stores (thin entry point)."""

from stimsynth.figures import save_study_figure

from stimsynth.logs import job_logging

with job_logging(snakemake.log[0]):
    save_study_figure(snakemake.input.table, snakemake.output.figure)

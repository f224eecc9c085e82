"""Audit every run of the study (thin entry point)."""

import json

from stimsynth.audit import audit_study, write_audit

from stimsynth.logs import job_logging

with job_logging(snakemake.log[0]):
    table = audit_study(snakemake.input.stores, json.loads(snakemake.params.thresholds))
    write_audit(table, snakemake.output.table, snakemake.output.summary)

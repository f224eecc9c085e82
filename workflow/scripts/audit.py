"""Audit every run of the study (thin entry point)."""

import json

from stimsynth.audit import audit_study, write_audit
from stimsynth.escalation import round_history, with_rounds
from stimsynth.logs import job_logging

with job_logging(snakemake.log[0]):
    table = audit_study(snakemake.input.stores, json.loads(snakemake.params.thresholds))
    round_history(snakemake.input.rounds, table).to_csv(
        snakemake.output.rounds, index=False
    )
    write_audit(with_rounds(table), snakemake.output.table, snakemake.output.summary)

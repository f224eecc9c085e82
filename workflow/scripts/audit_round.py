"""Audit the study after one round and list the runs to send back (thin entry point)."""

import json

from stimsynth.audit import audit_study
from stimsynth.escalation import write_round
from stimsynth.logs import job_logging

with job_logging(snakemake.log[0]):
    table = audit_study(snakemake.input.stores, json.loads(snakemake.params.thresholds))
    sent = write_round(table, snakemake.output.table, snakemake.output.failed)
    print(f"Round {snakemake.wildcards.round}: {len(sent)} runs sent back: {sent}")

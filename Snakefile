# stimsynth: a study from images to audited, plotted synthesis runs.
# Usage: snakemake --cores 2 [--configfile my_study.yaml]; see README.md.
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


# The default study, unless --configfile gives one: a study's config replaces it
# rather than merging into it.
if "images" not in config:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/images.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/synthesis.smk"
include: "workflow/rules/audit.smk"
include: "workflow/rules/figures.smk"


rule all:
    default_target: True
    input:
        f"{RESULTS}/audit.csv",
        f"{RESULTS}/figures/study.png",
        [f"{RESULTS}/figures/runs/{run}.png" for run in STUDY.runs],


onsuccess:
    summary = Path(RESULTS) / "audit.txt"
    if summary.exists():
        print(f"\n{summary.read_text()}")
        print(f"Audit table: {RESULTS}/audit.csv, figures: {RESULTS}/figures/")

# Audit: a verdict with reasons for every run, in one table for the study.


rule audit:
    input:
        stores=[f"{RESULTS}/runs/{run}.zarr" for run in STUDY.runs],
    output:
        table=f"{RESULTS}/audit.csv",
        summary=f"{RESULTS}/audit.txt",
    log:
        f"{RESULTS}/logs/audit.log",
    conda:
        "../../envs/stimsynth.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        thresholds=json.dumps(config["audit"], sort_keys=True),
    script:
        "../scripts/audit.py"

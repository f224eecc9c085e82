# Audit: a verdict with reasons for every run, in one table for the study.


rule audit:
    input:
        stores=lambda wc: list(latest_stores(ROUNDS).values()),
        rounds=[f"{RESULTS}/rounds/{r}/audit.csv" for r in range(ROUNDS)],
    output:
        table=f"{RESULTS}/audit.csv",
        summary=f"{RESULTS}/audit.txt",
        rounds=f"{RESULTS}/audit_rounds.csv",
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


# After round r (0: the first runs), the audit lists the runs to send back for
# round r + 1; a Snakemake checkpoint, since which runs those are is known only then.
checkpoint audit_round:
    input:
        stores=lambda wc: list(latest_stores(int(wc.round)).values()),
    output:
        table=f"{RESULTS}/rounds/{{round}}/audit.csv",
        failed=f"{RESULTS}/rounds/{{round}}/failed.json",
    log:
        f"{RESULTS}/logs/rounds/{{round}}/audit.log",
    wildcard_constraints:
        round=r"[0-9]+",
    conda:
        "../../envs/stimsynth.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        thresholds=json.dumps(config["audit"], sort_keys=True),
    script:
        "../scripts/audit_round.py"

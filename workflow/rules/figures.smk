# Figures: one per run and one for the study, made from the stores alone.


rule plot_run:
    input:
        store=lambda wc: latest_stores(ROUNDS)[wc.run],
    output:
        figure=report(
            f"{RESULTS}/figures/runs/{{run}}.png",
            caption="../report/run.rst",
            category="Runs",
            subcategory="{run}",
        ),
    log:
        f"{RESULTS}/logs/figures/{{run}}.log",
    wildcard_constraints:
        run="|".join(map(re.escape, STUDY.runs)),
    conda:
        "../../envs/stimsynth.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/plot_run.py"


rule plot_study:
    input:
        table=f"{RESULTS}/audit.csv",
        stores=lambda wc: list(latest_stores(ROUNDS).values()),
    output:
        figure=report(
            f"{RESULTS}/figures/study.png",
            caption="../report/study.rst",
            category="Study",
        ),
    log:
        f"{RESULTS}/logs/figures/study.log",
    conda:
        "../../envs/stimsynth.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/plot_study.py"

# Synthesis: one job and one run store per run, one rule per method.
# A run is written to a partial store outside the declared outputs (Snakemake deletes
# those when a job fails) and published at its output path only when complete.

for _method in METHODS:

    rule:
        name:
            f"synthesize_{_method}"
        input:
            unpack(run_inputs(_method)),
        output:
            store=directory(f"{RESULTS}/runs/{_method}/{{run}}.zarr"),
        log:
            f"{RESULTS}/logs/runs/{_method}/{{run}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/runs/{_method}/{{run}}.tsv"
        wildcard_constraints:
            run=run_pattern(_method),
        conda:
            "../../envs/stimsynth.yaml"
        threads: 1
        resources:
            gpu=1 if config["device"] == "cuda" else 0,
            mem_mb=synthesis_mem_mb,
            runtime=120,
        params:
            spec=run_params(_method),
            partial=lambda wc, method=_method: f"{RESULTS}/.partial/{method}/{wc.run}.zarr",
        script:
            "../scripts/synthesize.py"

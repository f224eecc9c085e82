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
        # torch computes with as many CPU threads as the job is given; a profile
        # can give synthesis more (set-threads).
        threads: 1
        resources:
            # Only device: cuda asks for a GPU. With auto a job uses a GPU that it
            # is given (a profile's set-resources) or finds free, the CPU otherwise.
            gpu=1 if config["device"] == "cuda" else 0,
            mem_mb=synthesis_mem_mb(_method),
            # Minutes; a retry (after a time-out) gets twice as long, and more.
            runtime=lambda wildcards, attempt: 120 * 2 ** (attempt - 1),
        params:
            spec=run_params(_method),
            partial=lambda wc, method=_method: f"{RESULTS}/.partial/{method}/{wc.run}.zarr",
            final_state=lambda wc, method=_method: (
                final_state_path(f"{method}/{wc.run}", 0)
                if method in ESCALATED
                else None
            ),
            continue_from=None,
        script:
            "../scripts/synthesize.py"


# A run sent back by the audit goes on from the state its last round ended in, with
# more iterations; its store holds the whole trajectory, earlier rounds included.
for _method in ESCALATED:

    rule:
        name:
            f"continue_{_method}"
        input:
            unpack(run_inputs(_method)),
            earlier=lambda wc, method=_method: store_path(
                f"{method}/{wc.run}", int(wc.round) - 1
            ),
        output:
            store=directory(f"{RESULTS}/rounds/{{round}}/runs/{_method}/{{run}}.zarr"),
        log:
            f"{RESULTS}/logs/rounds/{{round}}/runs/{_method}/{{run}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/rounds/{{round}}/runs/{_method}/{{run}}.tsv"
        wildcard_constraints:
            run=run_pattern(_method),
            round=r"[1-9][0-9]*",
        conda:
            "../../envs/stimsynth.yaml"
        threads: 1
        resources:
            gpu=1 if config["device"] == "cuda" else 0,
            mem_mb=synthesis_mem_mb(_method),
            runtime=lambda wildcards, attempt: 120 * 2 ** (attempt - 1),
        params:
            spec=lambda wc, method=_method: json.dumps(
                continued_spec(f"{method}/{wc.run}", int(wc.round)), sort_keys=True
            ),
            partial=lambda wc, method=_method: (
                f"{RESULTS}/.partial/rounds/{wc.round}/{method}/{wc.run}.zarr"
            ),
            final_state=lambda wc, method=_method: final_state_path(
                f"{method}/{wc.run}", int(wc.round)
            ),
            continue_from=lambda wc, input, method=_method: {
                "store": input.earlier,
                "checkpoint": final_state_path(
                    f"{method}/{wc.run}", int(wc.round) - 1
                ),
            },
        script:
            "../scripts/synthesize.py"

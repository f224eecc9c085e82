# Models and metrics: build each model once and pin it; check models and metrics on
# every image they will see. Checks are separate jobs, so that adding an image to a
# study checks the model on it without re-pinning the model, which would rerun every
# synthesis that uses it.


rule pin_model:
    output:
        pin=f"{RESULTS}/models/{{model}}.pt",
        report=f"{RESULTS}/models/{{model}}.json",
    log:
        f"{RESULTS}/logs/models/{{model}}.log",
    conda:
        "../../envs/stimsynth.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    params:
        entry=lambda wc: json.dumps(config["models"][wc.model], sort_keys=True),
        image_shape=lambda wc: STUDY.model_shapes[wc.model],
    script:
        "../scripts/pin_model.py"


rule check_model:
    input:
        pin=f"{RESULTS}/models/{{model}}.pt",
        image=f"{RESULTS}/images/{{image}}.zarr",
    output:
        report=f"{RESULTS}/checks/models/{{model}}/{{image}}.json",
    log:
        f"{RESULTS}/logs/checks/models/{{model}}/{{image}}.log",
    conda:
        "../../envs/stimsynth.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    script:
        "../scripts/check_model.py"


rule check_metric:
    input:
        image=f"{RESULTS}/images/{{image}}.zarr",
    output:
        report=f"{RESULTS}/checks/metrics/{{metric}}/{{image}}.json",
    log:
        f"{RESULTS}/logs/checks/metrics/{{metric}}/{{image}}.log",
    conda:
        "../../envs/stimsynth.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        entry=lambda wc: json.dumps(config["metrics"][wc.metric], sort_keys=True),
    script:
        "../scripts/check_metric.py"

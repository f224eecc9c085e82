# Models and metrics: build each once, check it on the images it will see, pin it.


rule prepare_model:
    input:
        images=lambda wc: [
            f"{RESULTS}/images/{name}.zarr" for name in STUDY.model_images[wc.model]
        ],
    output:
        pin=f"{RESULTS}/models/{{model}}.pt",
        report=f"{RESULTS}/models/{{model}}.json",
    log:
        f"{RESULTS}/logs/models/{{model}}.log",
    threads: 1
    conda:
        "../../envs/stimsynth.yaml"
    resources:
        mem_mb=4000,
        runtime=10,
    params:
        entry=lambda wc: json.dumps(config["models"][wc.model], sort_keys=True),
        image_shape=lambda wc: STUDY.model_shapes[wc.model],
        image_names=lambda wc: STUDY.model_images[wc.model],
    script:
        "../scripts/prepare_model.py"


rule prepare_metric:
    input:
        images=lambda wc: [
            f"{RESULTS}/images/{name}.zarr" for name in STUDY.metric_images[wc.metric]
        ],
    output:
        report=f"{RESULTS}/models/{{metric}}.json",
    log:
        f"{RESULTS}/logs/models/{{metric}}.log",
    threads: 1
    conda:
        "../../envs/stimsynth.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        entry=lambda wc: json.dumps(config["metrics"][wc.metric], sort_keys=True),
        image_names=lambda wc: STUDY.metric_images[wc.metric],
    script:
        "../scripts/prepare_metric.py"


ruleorder: prepare_model > prepare_metric

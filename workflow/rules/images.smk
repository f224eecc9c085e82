# Images: load each configured image once and prepare it for every run that uses it.


rule prepare_image:
    output:
        image=directory(f"{RESULTS}/images/{{image}}.zarr"),
    log:
        f"{RESULTS}/logs/images/{{image}}.log",
    conda:
        "../../envs/stimsynth.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        entry=lambda wc: json.dumps(config["images"][wc.image], sort_keys=True),
    script:
        "../scripts/prepare_image.py"

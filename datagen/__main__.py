"""Ray job entrypoint of the SPMS steps: ``python -m datagen synth|filter --config FILE``."""

from infu.steps import job_app

app = job_app("datagen")

if __name__ == "__main__":
    app()

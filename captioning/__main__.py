"""Ray job entrypoint of the caption step: ``python -m captioning caption --config FILE``."""

from infu.steps import job_app

app = job_app("captioning")

if __name__ == "__main__":
    app()

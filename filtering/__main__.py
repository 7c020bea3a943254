"""Ray job entrypoints of the SPSS data path: ``python -m filtering ingest|filter --config FILE``."""

from infu.steps import job_app

app = job_app("filtering")

if __name__ == "__main__":
    app()

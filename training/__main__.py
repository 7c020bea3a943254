"""Ray job entrypoint of the training steps: ``python -m training stage1 --config FILE``, and the planner:
``python -m training plan --config FILE``."""

from training.cli import app

if __name__ == "__main__":
    app()

"""Ray job entrypoint of the evaluation steps: ``python -m eval generate --config FILE`` and ``python -m
eval score --config FILE``, and ``python -m eval report --config FILE`` (prints the scored report)."""

from eval.cli import app

if __name__ == "__main__":
    app()

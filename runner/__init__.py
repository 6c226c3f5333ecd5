"""ramp-runner: run the submissions of a RAMP data challenge wherever the compute is."""

__version__ = "0.1.0"

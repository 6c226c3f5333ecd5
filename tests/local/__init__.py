"""Tests of runner/local: the conda worker, real ramp-test runs of the example kit."""

"""Runs on this machine: the conda worker, the supervised process tree, conda environments."""

"""Tests of runner/dask: the Dask worker on real clusters."""

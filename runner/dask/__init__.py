"""Runs on a dask.distributed cluster: the Dask worker, the task it submits, a loopback cluster."""

"""The real parts' fixtures (sshd, moto, PostgreSQL, Dask clusters, a stand-in conda) come
from the tests.real_parts plugin, registered here for the whole suite."""

pytest_plugins = ["tests.real_parts"]

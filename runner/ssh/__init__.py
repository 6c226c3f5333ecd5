"""Runs on hosts reached over SSH: the session, the remote-worker base, the SSH worker."""

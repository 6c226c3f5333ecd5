"""Tests of runner/ssh against a real sshd on 127.0.0.1: the session, the SSH worker, the
sandbox on the host."""

"""The Pulumi program that builds RAMP worker AMIs and gives the dispatcher SSH access.

A package so that tests import ``infra.<module>`` like any other code; ``__main__.py`` is
the entry point ``pulumi up`` runs from inside this directory.
"""

"""Pulumi entry point; the program lives in program.py so tests can run it with mocks."""

import program

program.main()

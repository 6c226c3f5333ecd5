"""Tests of infra/ (the Pulumi program, as a package) and of the AMI documents of ami/."""

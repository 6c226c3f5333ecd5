"""Runs on EC2: instance lifecycle, the AWS worker, AMI builds, Pulumi stack outputs."""

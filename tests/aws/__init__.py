"""Tests of runner/aws: EC2 on moto, the AWS worker with the local sshd as every instance,
Image Builder (build-ami) and the stack outputs."""

"""The fault suite: what ramp-runner does when the machine, the event or the input is bad."""

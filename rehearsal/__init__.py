"""Offline rehearsal of the real job: a Qwen3-8B-structured checkpoint on a loopback hub,
the official cMedQA2 layout on a loopback host, and the driver behind `make rehearse`."""

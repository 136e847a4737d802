"""hvha: high availability for VMs and applications on two servers, declared as code."""

__version__ = "0.1.0"

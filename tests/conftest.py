"""Shared pytest setup. The transformation tests need several devices; on the CPU that means
asking XLA for 8 host devices before JAX initializes its backend (a no-op if already set)."""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()

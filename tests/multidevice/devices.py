"""The environment of a subprocess with fake CPU devices."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def env(devices: int, **extra) -> dict:
    """os.environ with `devices` fake CPU devices added to XLA_FLAGS (the caller's other XLA
    flags kept, such as tests/conftest.py's optimisation level) and PYTHONPATH at the
    repository root; `extra` added last."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=ROOT, **extra)

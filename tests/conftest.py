import os

# Tests run on the CPU; keep JAX from probing for accelerators it will not find.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

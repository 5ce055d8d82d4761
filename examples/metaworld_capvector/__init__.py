"""The CapVector experiment on Meta-World, end to end through capmerge (``python -m examples.metaworld_capvector``)."""

import os

# MuJoCo picks its GL backend when metaworld first imports it: offscreen EGL, so that the vision experiment, which
# reuses this package, can render in the same process whichever package is imported first.
os.environ.setdefault("MUJOCO_GL", "egl")

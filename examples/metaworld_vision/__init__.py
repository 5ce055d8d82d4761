"""CapVector on Meta-World from pixels, with a spatial-perception auxiliary objective and a gate
(``python -m examples.metaworld_vision``)."""

import os

# Offscreen rendering on the CPU: MuJoCo reads MUJOCO_GL when it is first imported (by metaworld), so set it here.
os.environ.setdefault("MUJOCO_GL", "egl")

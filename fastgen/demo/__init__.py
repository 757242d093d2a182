"""The main job: DMD2 distillation end to end (``python -m fastgen.demo``).

One file per concern: ``data`` (digits, ring), ``networks``, ``train`` (teacher, DMD2 on
:class:`~fastgen.DMDPipeline`, samplers), ``metrics``, ``export``, ``plots``, and the jobs
``digits`` and ``ring`` behind the command line in ``cli``.
"""

from fastgen.demo.cli import main

__all__ = ["main"]

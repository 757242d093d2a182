"""Other libraries' module layouts over fastgen's code, for switching with an import change.

- :mod:`fastgen.compat.modelopt`: ``modelopt.torch.fastgen`` (NVIDIA Model Optimizer).
"""

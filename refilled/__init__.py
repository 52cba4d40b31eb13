"""REFILLED (CVPR 2020): cross-task knowledge distillation via relationship matching.

Models, data, losses and training live here and never import Ray; everything
that needs Ray lives in `refilled.tune`.
"""

"""Repairs without a network, each registered in hpc.registry.BASELINES: interpolation
(hpc.baselines.interp: linear, biharmonic, axial3d) and physics (hpc.baselines.reproject: OSEM from
the measured bins, projected into the gaps). Every entry has the signature of
hpc.baselines.stack.Baseline; validation (hpc.train.validate) and ``hpc evaluate`` list and run them
from the registry, so a new baseline is one registered function.
"""

"""Prefect flows that drive the DIET pipeline's DVC stages: run, sweep, schedule, share.

DVC owns the stage graph and the cache; these flows decide which ``dvc`` command runs when, pass paths
(never models or tensors), and never import torch or the model code.
"""

"""Kubeflow Pipelines components: thin adapters from KFP artifacts and parameters to the `rlhf` core.

KFP copies each component function's source into the container, so every import of the core happens
inside the function body.
"""

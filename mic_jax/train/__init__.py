"""The training loop's parts: the step, the optimizer, checkpoints, faults.

The loop itself, which drives these, evaluation and the feature cache, is
:mod:`mic_jax.trainer`.
"""

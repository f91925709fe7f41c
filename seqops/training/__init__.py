"""Training: the step dataset, the losses, the loop with its state and checkpoints, validation.

Nothing is imported here, so ``import seqops.training.sampling``-style imports of the
torch-free parts stay torch-free.
"""

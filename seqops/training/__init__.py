"""Training: the step dataset, the losses, the loop with its state and checkpoints, validation.

Nothing is imported here, so importing a torch-free part (``seqops.training.outputs``)
does not import torch.
"""

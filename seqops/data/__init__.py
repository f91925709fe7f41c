"""Datasets: sources (synthetic, FSC-147, COCO), ordering, and the prepared-dataset format."""

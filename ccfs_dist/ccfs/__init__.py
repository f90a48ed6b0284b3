"""The method: the curriculum (the paper's loop), the coarse-to-fine selection, the difficulty methods."""

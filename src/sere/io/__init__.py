"""Reading and writing files of weights: checkpoints, any supported weights file, exports."""

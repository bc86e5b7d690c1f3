"""The model loop: calibration capture, one block's solves, reconstruction, the run report, ranks, the block writer."""

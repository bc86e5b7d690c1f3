"""Text for calibration and perplexity: local files and hub datasets, the calibration sampler."""

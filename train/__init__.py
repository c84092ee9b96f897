"""Training: episodic training of any registered method, data sets and evaluation."""

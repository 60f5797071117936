"""Built-in tasks: prompt/SFT data generators and programmatic annotators."""

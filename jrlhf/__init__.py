"""jrlhf: accelerator-native RLHF in JAX/Flax."""

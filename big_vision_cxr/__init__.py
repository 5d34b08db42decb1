"""big_vision_cxr: PaliGemma-CXR in JAX/Flax, in the style of big_vision."""

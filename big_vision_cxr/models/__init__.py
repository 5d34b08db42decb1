"""Model definitions: SigLIP ViT, Gemma and PaliGemma (big_vision param layout)."""

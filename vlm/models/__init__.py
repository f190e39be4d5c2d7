"""Model parts (vision encoders, projectors, decoders) and their composition, `VisionLanguageModel`.

Heavy libraries (transformers, timm) are imported by the submodules that need them, not here.
"""

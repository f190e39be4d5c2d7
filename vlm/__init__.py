"""vlm: train vision-language models in stages (clip, lm, align, sft) with Lightning and Hydra."""

__version__ = "0.1.0"

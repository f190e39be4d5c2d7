"""Bridges between vlm models and other libraries' checkpoint layouts (transformers' Llava: `vlm.interop.llava`)."""

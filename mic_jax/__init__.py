"""mic_jax: multimodal (title + photo) item categorization in JAX/Flax.

The design follows "Multimodal Item Categorization Fully Based on Transformers"
(Chen et al., 2021): a BERT text tower, a ViT (or BiT) image tower, and late,
early-shallow or gated cross-modal attention fusion.
"""

__version__ = "0.1.0"

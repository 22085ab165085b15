"""GGUF tools for flashmoe: reading (single or split), synthetic MoE models, inspection, repacking."""

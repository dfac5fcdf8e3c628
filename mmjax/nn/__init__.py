"""Layers shared by the towers. Every attention goes through `attention.dot_product_attention`."""

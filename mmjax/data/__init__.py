"""Data: TFDS builders (embedded digits, image folder + captions), tokenizer, input pipeline."""

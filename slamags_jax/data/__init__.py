"""Cell images: folder discovery and decoding, TFDS builders, augmentation and the input pipeline."""

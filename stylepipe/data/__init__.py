"""Data: image sources, normalisation, preparation and the batches training reads."""

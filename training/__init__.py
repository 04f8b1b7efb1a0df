"""Builds the embedded FLUX.1-architecture model: shapes dataset, autoencoder, text encoders, transformer."""

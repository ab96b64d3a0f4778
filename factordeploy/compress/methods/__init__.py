"""One module per compression method; each registers itself with compress.base.register."""

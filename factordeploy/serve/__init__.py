"""Serving a build: files other stacks read (Hugging Face / Optimum), the ORT-optimized graph decision,
a Triton model repository, and reading folders back (`open_build_folder`, `deploy inspect`).

Sits above engines/ (it measures ORT sessions) and below verify/ (verify.folder_check re-checks a folder).
"""

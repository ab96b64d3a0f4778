"""Serving outputs of a finished build folder: files other stacks read (Hugging Face / Optimum),
a Triton model repository, and the folder-level tools `deploy inspect` / `deploy verify`.

Sits after verify/ in the layer order (it reads what the build wrote and reuses verify/'s
checks); nothing below it imports it.
"""

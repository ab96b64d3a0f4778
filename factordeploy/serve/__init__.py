"""serve/: run and hand over a built folder - text generation with a KV cache over a swappable step runner
(generate.py, runners.py); files other stacks read (Hugging Face / Optimum: hf_files.py), the ORT-optimized
graph decision (ort_optimized.py), a Triton model repository (triton.py), and reading folders back
(folder.py, inspect.py). Above engines/, below verify/ (verify.folder_check re-checks a folder).
"""

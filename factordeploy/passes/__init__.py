"""passes/: onnx-graphsurgeon rewrites (naming, folding, low-rank chains, 2:4 layout, plugin nodes)."""

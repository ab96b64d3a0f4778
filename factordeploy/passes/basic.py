"""Generic cleanup: constant folding that never refolds factorized weights into dense ones.

Folding only evaluates nodes whose inputs are all constant. A factorized layer's chain
starts from the activation, so it is never folded; we additionally exclude every node
named as part of a factorized layer (see annotate.py) in case an exporter emitted a
constant-only product such as MatMul(B, A).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .annotate import FD_PREFIX
from .pipeline import PassContext, graph_pass


@graph_pass("fold-constants", "fold constant subgraphs, keeping factorized layers factored")
def fold_constants(graph: gs.Graph, ctx: PassContext) -> None:
    protected = [n for n in graph.nodes if (n.name or "").startswith(FD_PREFIX)]
    # Temporarily hide protected nodes' constant inputs behind variables so folding skips them.
    hidden = []
    for n in protected:
        for i, t in enumerate(n.inputs):
            if isinstance(t, gs.Constant) and len(n.inputs) > 1 and all(isinstance(x, gs.Constant) for x in n.inputs):
                proxy = gs.Variable(t.name + "__fd_protect", dtype=t.dtype, shape=t.shape)
                hidden.append((n, i, t))
                n.inputs[i] = proxy
    before = len(graph.nodes)
    graph.fold_constants(error_ok=True).cleanup()
    for n, i, t in hidden:
        n.inputs[i] = t
    ctx.note("fold-constants", folded=before - len(graph.nodes), protected_nodes=len(protected))

"""Generic cleanup: constant folding that never refolds factorized weights and never bloats the model.

Folding only evaluates nodes whose inputs are all constant. A factorized layer's chain
starts from the activation, so it is never folded; we additionally exclude every
multi-input node named as part of a factorized layer (see annotate.py) in case an exporter
emitted a constant-only product such as MatMul(B, A). Single-input ops on a factor
(Transpose, Cast) still fold.

Folded outputs above FOLD_SIZE_LIMIT bytes are not materialised: folding e.g. the
Transpose of a tied embedding would store a second copy of it (108 MiB for SmolLM2's LM
head), making the "compressed" file larger than the original.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .annotate import FD_PREFIX
from .pipeline import PassContext, graph_pass

FOLD_SIZE_LIMIT = 1 << 20  # bytes


def _protected(node: gs.Node) -> bool:
    return (node.name or "").startswith(FD_PREFIX) and len(node.inputs) > 1


@graph_pass("fold-constants", "fold constant subgraphs, keeping factorized layers factored")
def fold_constants(graph: gs.Graph, ctx: PassContext) -> None:
    before = len(graph.nodes)
    protected = sum(1 for n in graph.nodes if _protected(n))
    graph.fold_constants(error_ok=True, size_threshold=FOLD_SIZE_LIMIT, should_exclude_node=_protected).cleanup()
    ctx.note("fold-constants", folded=before - len(graph.nodes), protected_nodes=protected,
             size_limit_bytes=FOLD_SIZE_LIMIT)

"""Walking the graph of a Keras Functional model (shared by cloning and export)."""

from tfdq import _compat


def producer(tensor):
    """``(layer, node)`` that produced a KerasTensor, or ``(None, None)`` for inputs."""
    history = _compat.keras_history(tensor)
    if history is None or history.operation is None:
        return None, None
    layer = history.operation
    node = _compat.inbound_nodes(layer)[history.node_index]
    if node.is_input:
        return None, None
    return layer, node


def model_nodes(model):
    """``(layer, node)`` pairs of ``model``'s own graph, inputs first.

    Walks back from the outputs, so nodes a layer has in other models (a
    loaded Sequential keeps extra ones) are left out.
    """
    seen, order = set(), []

    def visit(tensor):
        layer, node = producer(tensor)
        if node is None or id(node) in seen:
            return
        seen.add(id(node))
        for t in node.input_tensors:
            visit(t)
        order.append((layer, node))

    for out in model.outputs:
        visit(out)
    return order

"""int8 dynamic quantisation of an exported graph's linear layers (ONNX Runtime's quantize_dynamic).

Weights become int8 (per output channel), activations are quantised on the fly per
tensor. Only MatMuls with a constant weight are quantised: attention's q.k and
softmax.v products stay fp32. A linear layer the exporter wrote as ``Gemm``
(torch.nn.Linear on a 2-D input) is first rewritten as ``MatMul`` + ``Add``,
because quantize_dynamic handles MatMul only.
"""
from __future__ import annotations

from pathlib import Path


def gemm_to_matmul(model) -> int:
    """Rewrite each Gemm(A, constant B, C) with alpha = beta = 1, transA = 0 as MatMul + Add; the count."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, changed = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T.copy()
        name = f"{node.input[1]}_for_matmul"
        model.graph.initializer.append(numpy_helper.from_array(weight, name))
        has_bias = len(node.input) > 2 and bool(node.input[2])
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product]))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]]))
        changed += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    # The transposed-away weights are no longer read by any node.
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    onnx.checker.check_model(model)
    return changed


def quantize_int8(src: Path, dest: Path) -> None:
    """``src`` (fp32 graph) -> ``dest`` with int8 weights in its linear layers."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    gemm_to_matmul(model)
    staged = dest.with_name(dest.stem + ".matmul.onnx")
    onnx.save(model, str(staged))
    try:
        quantize_dynamic(str(staged), str(dest), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
    finally:
        staged.unlink(missing_ok=True)

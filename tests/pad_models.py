"""Small liveness models with the MiniFASNet interface (1x3xSxS BGR 0-255 in, class logits out, "real" at
index 1), built by the tests: logits = mean colour of the crop @ W + b."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def linear_pad_model(path: Path, weights: np.ndarray, bias: np.ndarray, size: int = 80) -> Path:
    classes = weights.shape[1]
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["m"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["m", "W"], ["z"]),
            helper.make_node("Add", ["z", "b"], ["output"]),
        ],
        "pad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, classes])],
        [
            helper.make_tensor("W", TensorProto.FLOAT, weights.shape, weights.astype(np.float32).ravel()),
            helper.make_tensor("b", TensorProto.FLOAT, bias.shape, bias.astype(np.float32).ravel()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def constant_pad_model(path: Path, p_real: float, classes: int = 3, size: int = 80) -> Path:
    """Says every face is real with probability `p_real`."""
    logits = np.zeros(classes)
    others = (1 - p_real) / (classes - 1)
    logits[:] = np.log(others)
    logits[1] = np.log(p_real)
    return linear_pad_model(path, np.zeros((3, classes)), logits, size)


def red_is_real_model(path: Path, size: int = 80) -> Path:
    """Real when the crop is more red than blue (input channel 2 minus channel 0: BGR order)."""
    w = np.zeros((3, 3))
    w[2, 1], w[0, 1] = 10 / 255, -10 / 255
    return linear_pad_model(path, w, np.zeros(3), size)

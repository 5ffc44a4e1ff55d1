"""Weight layouts: ONNX Runtime MatMulNBits, blocked DequantizeLinear (+ its fusion), AutoAWQ GEMM.

References: onnxruntime executes the one-node models (against x @ dequantize(w).T in float64),
onnx's own uint4 unpacker reads the uint4 tensors, and the AutoAWQ functions below are
transcribed from AutoAWQ (casper-hansen/AutoAWQ): ``unpack_awq``, ``reverse_awq_order`` and
``dequantize_gemm`` from awq/utils/packing_utils.py, and the packing loop of
``WQLinear_GEMM.from_linear`` from awq/modules/linear/gemm.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from omni_export.quant import rtn
from omni_export.quant.packing import (
    pack_autoawq,
    pack_bits,
    to_blocked_dq,
    to_matmulnbits,
    uint4_tensor,
    unpack_autoawq,
)
from omni_export.quant.types import QuantWeight

# ------------------------------------------------------------------------------------ helpers


def random_quant(n: int, k: int, group_size: int, bits: int = 4, symmetric: bool = False, seed: int = 0) -> QuantWeight:
    rng = np.random.default_rng(seed)
    return rtn.quantize(rng.normal(0, 0.02, (n, k)).astype(np.float32), group_size, bits=bits, symmetric=symmetric)


def reference(x: np.ndarray, w: QuantWeight) -> np.ndarray:
    return x.astype(np.float64) @ w.dequantize().astype(np.float64).T


def session(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, config=None, optimized=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def rel_rms(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y - ref) ** 2) / np.mean(ref**2)))


def matmulnbits_model(w: QuantWeight, accuracy_level: int, with_zero_points: bool = True) -> onnx.ModelProto:
    b, scales, zero_points = to_matmulnbits(w)
    n, k = w.q.shape
    inputs = ["x", "B", "scales"] + (["zero_points"] if with_zero_points else [])
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")]
    if with_zero_points:
        inits.append(numpy_helper.from_array(zero_points, "zero_points"))
    node = helper.make_node(
        "MatMulNBits", inputs, ["y"], domain="com.microsoft",
        K=k, N=n, bits=w.bits, block_size=w.group_size, accuracy_level=accuracy_level,
    )
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def dq_model(w: QuantWeight) -> onnx.ModelProto:
    levels, scale, zero_point = to_blocked_dq(w)
    k, n = levels.shape
    if w.bits == 4:
        inits = [uint4_tensor("W_q", levels), numpy_helper.from_array(scale, "W_scale"), uint4_tensor("W_zp", zero_point)]
    else:
        inits = [numpy_helper.from_array(levels, "W_q"), numpy_helper.from_array(scale, "W_scale"),
                 numpy_helper.from_array(zero_point, "W_zp")]
    nodes = [
        helper.make_node("DequantizeLinear", ["W_q", "W_scale", "W_zp"], ["W"], axis=0, block_size=w.group_size),
        helper.make_node("MatMul", ["x", "W"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    return model


def x_for(k: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (5, k)).astype(np.float32)


# ------------------------------------------------------------------------------------ MatMulNBits

SHAPES = [(96, 64), (128, 64), (160, 64), (4096, 64), (96, 3584), (160, 3584), (4096, 512)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,n", SHAPES)
def test_matmulnbits_matches_dequantized_matmul(k, n, bits):
    w = random_quant(n, k, 128, bits=bits)
    x = x_for(k)
    ref = reference(x, w)
    y = session(matmulnbits_model(w, accuracy_level=0)).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # accuracy_level 4: A is quantized to int8 per block inside ORT (~1% error)
    y4 = session(matmulnbits_model(w, accuracy_level=4)).run(None, {"x": x})[0]
    assert rel_rms(y4, ref) < 2e-2


@pytest.mark.parametrize("group_size", [16, 32, 64, 256])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matmulnbits_block_sizes_and_bits(group_size, bits):
    w = random_quant(24, 200, group_size, bits=bits, seed=3)  # 200: partial last block for every size
    x = x_for(200)
    ref = reference(x, w)
    y = session(matmulnbits_model(w, accuracy_level=0)).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_matmulnbits_symmetric_default_zero_point():
    """Symmetric weights store zero point 2**(bits-1): ORT's default when zero_points is absent."""
    w = random_quant(64, 160, 32, symmetric=True)
    x = x_for(160)
    ref = reference(x, w)
    for with_zp in (True, False):
        y = session(matmulnbits_model(w, accuracy_level=0, with_zero_points=with_zp)).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_matmulnbits_layout_by_hand():
    """The documented layout on a small example: low nibble first, K zero-padded, zero points
    two per byte with each row padded to a whole byte."""
    q = np.arange(2 * 40, dtype=np.uint8).reshape(2, 40) % 16
    w = QuantWeight(q=q, scales=np.array([[1, 2, 3], [4, 5, 6]], np.float32),
                    zeros=np.array([[1, 2, 3], [4, 5, 6]], np.uint8), group_size=16)
    b, scales, zp = to_matmulnbits(w)
    assert b.shape == (2, 3, 8) and b.dtype == np.uint8
    assert b[0, 0, 0] == q[0, 0] | (q[0, 1] << 4)
    assert b[1, 2, 3] == q[1, 38] | (q[1, 39] << 4)
    assert (b[:, 2, 4:] == 0).all()  # K = 40 padded to 48
    assert scales.tolist() == [1, 2, 3, 4, 5, 6] and scales.dtype == np.float32
    assert zp.tolist() == [1 | 2 << 4, 3, 4 | 5 << 4, 6]
    assert pack_bits(np.array([[1, 2, 3, 0, 3]], np.uint8), 2).tolist() == [[1 | 2 << 2 | 3 << 4, 3]]


def test_matmulnbits_rejects_non_power_of_two_blocks():
    with pytest.raises(ValueError, match="power-of-two"):
        to_matmulnbits(random_quant(8, 96, 48))


# ------------------------------------------------------------------------------------ DequantizeLinear


def test_uint4_tensor_round_trips_through_onnx():
    rng = np.random.default_rng(0)
    for shape in [(7, 5), (160, 64), (3,)]:
        levels = rng.integers(0, 16, shape).astype(np.uint8)
        t = uint4_tensor("t", levels)
        assert t.data_type == TensorProto.UINT4 and list(t.dims) == list(shape)
        assert np.array_equal(numpy_helper.to_array(t).astype(np.uint8), levels)
    with pytest.raises(ValueError):
        uint4_tensor("t", np.array([16]))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [96, 128, 160, 4096])
def test_blocked_dq_matmul_matches_and_fuses(k, bits, tmp_path):
    """DequantizeLinear(axis 0, block_size) + MatMul == x @ dequantize(w).T, and ORT's
    level-2 (extended) optimizer fuses it into MatMulNBits, also with a partial last block."""
    w = random_quant(64, k, 128, bits=bits)
    x = x_for(k)
    ref = reference(x, w)
    model = dq_model(w)

    y = session(model).run(None, {"x": x})[0]  # no optimization: the standard ops
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())

    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        path = tmp_path / f"opt{int(level)}.onnx"
        # the fused node's accuracy level comes from this session option (default 4: int8 A)
        sess = session(model, level, config={"session.qdq_matmulnbits_accuracy_level": "0"}, optimized=path)
        ops = [node.op_type for node in onnx.load(path).graph.node]
        assert "MatMulNBits" in ops and "DequantizeLinear" not in ops, ops
        y = sess.run(None, {"x": x})[0]
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

    path = tmp_path / "default.onnx"
    y = session(model, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, optimized=path).run(None, {"x": x})[0]
    fused = [n for n in onnx.load(path).graph.node if n.op_type == "MatMulNBits"]
    assert [helper.get_attribute_value(a) for a in fused[0].attribute if a.name == "accuracy_level"] == [4]
    assert rel_rms(y, ref) < 2e-2


def test_basic_level_does_not_fuse(tmp_path):
    w = random_quant(64, 160, 128)
    path = tmp_path / "basic.onnx"
    session(dq_model(w), ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, optimized=path)
    assert [n.op_type for n in onnx.load(path).graph.node] == ["DequantizeLinear", "MatMul"]


# ------------------------------------------------------------------------------------ AutoAWQ

AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def autoawq_unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int):
    shifts = torch.arange(0, 32, bits, device=qzeros.device)
    iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iweights = iweights.view(iweights.shape[0], -1)
    izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
    izeros = izeros.view(izeros.shape[0], -1)
    return iweights, izeros


def autoawq_reverse_awq_order(iweights: torch.Tensor, izeros: torch.Tensor, bits: int):
    reverse_order_tensor = torch.arange(izeros.shape[-1], dtype=torch.int32, device=izeros.device)
    reverse_order_tensor = reverse_order_tensor.view(-1, 32 // bits)
    reverse_order_tensor = reverse_order_tensor[:, AWQ_REVERSE_ORDER]
    reverse_order_tensor = reverse_order_tensor.view(-1)
    izeros = izeros[:, reverse_order_tensor]
    iweights = iweights[:, reverse_order_tensor]
    return iweights, izeros


def autoawq_dequantize_gemm(qweight, qzeros, scales, bits, group_size):
    """[K, N] float weight, as AutoAWQ's ``dequantize_gemm`` (its matmul is x @ this)."""
    iweight, izeros = autoawq_unpack_awq(qweight, qzeros, bits)
    iweight, izeros = autoawq_reverse_awq_order(iweight, izeros, bits)
    iweight = torch.bitwise_and(iweight, (2**bits) - 1)
    izeros = torch.bitwise_and(izeros, (2**bits) - 1)
    scales = scales.repeat_interleave(group_size, dim=0)
    izeros = izeros.repeat_interleave(group_size, dim=0)
    return (iweight - izeros) * scales


def autoawq_from_linear_pack(intweight_nk: torch.Tensor, zeros_gn: torch.Tensor, w_bit: int = 4):
    """The packing loops of ``WQLinear_GEMM.from_linear``: intweight [N, K] (its layout before
    ``.t()``), zeros [G, N] -> (qweight [K, N/8], qzeros [G, N/8]) int32."""
    pack_num = 32 // w_bit
    intweight = intweight_nk.t().contiguous().to(dtype=torch.int32)
    qweight = torch.zeros((intweight.shape[0], intweight.shape[1] // 32 * w_bit), dtype=torch.int32)
    for col in range(intweight.shape[1] // pack_num):
        order_map = [0, 2, 4, 6, 1, 3, 5, 7]
        for i in range(pack_num):
            qweight_col = intweight[:, col * pack_num + order_map[i]]
            qweight[:, col] |= qweight_col << (i * w_bit)
    zeros = zeros_gn.to(dtype=torch.int32)
    qzeros = torch.zeros((zeros.shape[0], zeros.shape[1] // 32 * w_bit), dtype=torch.int32)
    for col in range(zeros.shape[1] // pack_num):
        order_map = [0, 2, 4, 6, 1, 3, 5, 7]
        for i in range(pack_num):
            qzero_col = zeros[:, col * pack_num + order_map[i]]
            qzeros[:, col] |= qzero_col << (i * w_bit)
    return qweight, qzeros


def fp16_scales(w: QuantWeight) -> QuantWeight:
    w.scales = w.scales.astype(np.float16).astype(np.float32)
    return w


@pytest.mark.parametrize("n,k,group_size", [(64, 128, 32), (96, 256, 128), (32, 64, 64)])
def test_pack_autoawq_matches_autoawq_from_linear(n, k, group_size):
    w = fp16_scales(random_quant(n, k, group_size, seed=5))
    qweight, qzeros, scales = pack_autoawq(w)
    ref_qweight, ref_qzeros = autoawq_from_linear_pack(torch.from_numpy(w.q.astype(np.int32)),
                                                       torch.from_numpy(w.zeros.T.astype(np.int32)))
    assert qweight.dtype == np.int32 and qzeros.dtype == np.int32 and scales.dtype == np.float16
    assert qweight.shape == (k, n // 8) and qzeros.shape == (k // group_size, n // 8) and scales.shape == (k // group_size, n)
    assert np.array_equal(qweight, ref_qweight.numpy())
    assert np.array_equal(qzeros, ref_qzeros.numpy())
    assert np.array_equal(scales.astype(np.float32), w.scales.T)


@pytest.mark.parametrize("n,k,group_size", [(64, 128, 32), (96, 256, 128)])
def test_unpack_autoawq_matches_autoawq_dequantize_gemm(n, k, group_size):
    rng = np.random.default_rng(7)
    # random int32 words, including negative ones (top nibble >= 8)
    qweight = rng.integers(-(2**31), 2**31, (k, n // 8), dtype=np.int64).astype(np.int32)
    qzeros = rng.integers(-(2**31), 2**31, (k // group_size, n // 8), dtype=np.int64).astype(np.int32)
    scales = rng.uniform(1e-4, 1e-2, (k // group_size, n)).astype(np.float16)
    w = unpack_autoawq(qweight, qzeros, scales, group_size)
    assert w.q.shape == (n, k) and w.zeros.shape == (n, k // group_size) and w.scales.dtype == np.float32
    ref = autoawq_dequantize_gemm(torch.from_numpy(qweight), torch.from_numpy(qzeros),
                                  torch.from_numpy(scales).float(), 4, group_size)
    np.testing.assert_array_equal(w.dequantize(), ref.numpy().T)
    # and back, bit for bit
    back = pack_autoawq(w)
    assert np.array_equal(back[0], qweight) and np.array_equal(back[1], qzeros) and np.array_equal(back[2], scales)


def test_autoawq_round_trip_is_exact():
    w = fp16_scales(random_quant(3584 // 28, 512, 128, seed=9))
    assert unpack_autoawq(*pack_autoawq(w), group_size=128).equals(w)


def test_autoawq_rejects_unsupported_shapes():
    with pytest.raises(ValueError, match="divisible by 8"):
        pack_autoawq(random_quant(12, 128, 32))
    with pytest.raises(ValueError, match="in_features"):
        pack_autoawq(random_quant(16, 160, 128))
    with pytest.raises(ValueError, match="4-bit"):
        pack_autoawq(random_quant(16, 128, 32, bits=8))
    qweight, qzeros, scales = pack_autoawq(random_quant(16, 128, 32))
    with pytest.raises(ValueError, match="groups of"):
        unpack_autoawq(qweight, qzeros, scales, 64)
    with pytest.raises(ValueError, match="int32"):
        unpack_autoawq(qweight.astype(np.int64), qzeros, scales, 32)

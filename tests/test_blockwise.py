"""amct_pytorch.blockwise against the runtimes it emulates: llama.cpp's own quantize_row_q8_0
(ctypes into the libggml-cpu that llama-cpp-python installs), gguf's NumPy Q8_0/Q4_0 quantizers
(byte for byte, which match llama.cpp's C reference) and ONNX Runtime's MatMulNBits at
accuracy_level=4."""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import os

import numpy as np
import pytest
import torch

from amct_pytorch import blockwise as bw
from amct_pytorch.export.gguf import QuantBlocks, pack_blocks, unpack_blocks

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="the 'gguf' package is not installed (pip install gguf==0.19.0)")
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")


def _ties_q8(rows: int, k: int, rng) -> np.ndarray:
    """Blocks whose amax is 127, so that d = 1 and 127/amax = 1/d = 1: every x.5 is an exact tie."""
    x = (rng.integers(-127, 127, (rows, k)) + 0.5).astype(np.float32)
    x[:, ::32] = np.where(rng.random((rows, k // 32)) < 0.5, 127.0, -127.0)
    return x


def _discriminating(rows: int, k: int, block: int, rng) -> np.ndarray:
    """Blocks each holding an element that rounds differently with 127/amax than with 1/(amax/127)."""
    out = np.zeros((rows, k), np.float32)
    for r in range(rows):
        for b0 in range(0, k, block):
            while True:
                amax = np.float32(rng.uniform(0.5, 8.0))
                ia, ib = np.float32(127) / amax, np.float32(1) / (amax / np.float32(127))
                if ia == ib:
                    continue
                x0 = np.float32(amax * (rng.integers(0, 126) + 0.5) / 127)
                hits = [np.float32(x0 + du * np.spacing(x0)) for du in range(-4, 5)]
                hits = [x for x in hits if np.rint(x * ia) != np.rint(x * ib)]
                if hits:
                    out[r, b0], out[r, b0 + 1] = amax, hits[0]
                    break
    return out


def _activation_data(k: int = 256, block: int = 32) -> np.ndarray:
    rng = np.random.default_rng(20)
    parts = [rng.standard_normal((200, k)).astype(np.float32),
             (rng.uniform(-1, 1, (200, k)) * 10.0 ** rng.uniform(-4, 4, (200, 1))).astype(np.float32),
             _ties_q8(50, k, rng), _discriminating(30, k, block, rng), np.zeros((2, k), np.float32)]
    heavy = rng.standard_normal((50, k)).astype(np.float32)
    heavy[:, 5::37] *= 40.0  # outliers
    parts.append(heavy)
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- llama.cpp activations

def _libggml_cpu():
    spec = importlib.util.find_spec("llama_cpp")
    root = os.path.dirname(spec.origin)
    exact = os.path.join(root, "lib", "libggml-cpu.so")  # the build's one CPU backend (not a per-ISA variant)
    found = [exact] if os.path.exists(exact) else sorted(glob.glob(os.path.join(root, "lib", "libggml-cpu*.so*")))
    if not found:
        pytest.fail(f"llama_cpp is installed but {root}/lib holds no libggml-cpu shared library")
    lib = ctypes.CDLL(found[0])
    fn = lib.quantize_row_q8_0
    fn.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    return fn


def _llama_q8_0(fn, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    row = np.ascontiguousarray(row, dtype=np.float32)
    nb = row.size // 32
    out = np.zeros(nb * 34, np.uint8)
    fn(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.ctypes.data, row.size)
    blocks = out.reshape(nb, 34)
    return blocks[:, 2:].copy().view(np.int8).reshape(-1), blocks[:, :2].copy().view("<f2").reshape(-1)


@needs_llama
def test_activation_codes_bit_exact_against_llama_cpp_quantize_row_q8_0():
    fn = _libggml_cpu()
    x = _activation_data()
    codes, d = bw.quantize_act_blocks(torch.from_numpy(x), bw.LLAMA_CPP_X86_Q8_0)
    ref_codes = np.zeros_like(x, dtype=np.int8)
    ref_d = np.zeros((x.shape[0], x.shape[1] // 32), np.float16)
    for r in range(x.shape[0]):
        ref_codes[r], ref_d[r] = _llama_q8_0(fn, x[r])
    assert np.array_equal(codes.numpy(), ref_codes), int((codes.numpy() != ref_codes).sum())
    assert np.array_equal(d.numpy().astype(np.float16).view(np.uint16), ref_d.view(np.uint16))
    # the data does tell the variants apart: the scalar reference (1/d, roundf) differs on ties and
    # on the 127/amax-vs-1/d rows, NEON's 1/d on the latter
    for other in (bw.LLAMA_CPP_REFERENCE_Q8_0, bw.LLAMA_CPP_NEON_Q8_0):
        c2, _ = bw.quantize_act_blocks(torch.from_numpy(x), other)
        assert not np.array_equal(c2.numpy(), ref_codes), other


@needs_gguf
def test_reference_activation_spec_is_ggml_reference_q8_0():
    """gguf's NumPy Q8_0 is llama.cpp's C reference (quantize_row_q8_0_ref) byte for byte."""
    import gguf

    x = _activation_data()
    codes, d = bw.quantize_act_blocks(torch.from_numpy(x), bw.LLAMA_CPP_REFERENCE_Q8_0)
    ours = pack_blocks(QuantBlocks(codes, d.to(torch.float16), "q8_0"))
    assert np.array_equal(ours, gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0))


# ----------------------------------------------------------------------------- weights vs gguf

def _weight_data(fmt: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    k = 128
    w = rng.standard_normal((64, k)).astype(np.float32) * np.float32(0.05)
    w[1] *= 1e-4  # fp16 subnormal scales
    w[2] *= 1e3
    w[3] = 0.0  # zero blocks: d = 0, id = 0
    w[4, :32] = 0.0
    w[4, 3], w[4, 9] = -0.5, 0.5  # equal magnitudes of both signs: the first one sets Q4_0's signed d
    w[5, :32], w[5, 40] = np.abs(w[5, :32]), -3.0
    if fmt == "q8_0":
        w[6:22] = _ties_q8(16, k, rng)  # d = 1: roundf's ties (away from zero)
    else:
        t = rng.integers(-8, 7, (16, k)).astype(np.float32) + np.float32(0.5)
        t[:, ::32] = -8.0  # max = -8 -> d = 1, id = 1: x + 8.5 lands on integers
        w[6:22] = t
    return w


@needs_gguf
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_weight_blocks_byte_equal_to_gguf_quantizers(fmt):
    import gguf

    w = _weight_data(fmt)
    blocks = QuantBlocks.from_float(torch.from_numpy(w), fmt)
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType[fmt.upper()])
    assert np.array_equal(pack_blocks(blocks), ref)
    back = unpack_blocks(ref, fmt, w.shape)
    assert torch.equal(back.codes, blocks.codes) and torch.equal(back.scales.view(torch.int16),
                                                                  blocks.scales.view(torch.int16))
    deq = gguf.quants.dequantize(ref, gguf.GGMLQuantizationType[fmt.upper()])
    assert np.array_equal(blocks.dequantize().numpy(), deq)


def test_q4_0_signed_scale_and_code_range():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 2.0, -1.0  # largest magnitude positive -> d negative, code -8
    codes, d = bw.weight_codes_from_float(w, "q4_0")
    assert float(d[0, 0]) == -0.25 and int(codes[0, 0]) == -8 and int(codes[0, 1]) == 4
    w[0, 0] = -2.0
    codes, d = bw.weight_codes_from_float(w, "q4_0")
    assert float(d[0, 0]) == 0.25 and int(codes[0, 0]) == -8 and int(codes[0, 1]) == -4


# ----------------------------------------------------------------------------- ONNX Runtime level 4

def _matmulnbits_identity(k: int, block: int, level: int):
    """A one-node MatMulNBits graph whose int4 weight is the identity: W[k, n] = (k == n), codes 1 with
    zero point 0 and scale 1, so Y = the kernel's dequantized activation (scale_a * code_a)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nb = -(-k // block)
    nib = np.zeros((k, nb * block), np.uint8)
    nib[np.arange(k), np.arange(k)] = 1
    packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).reshape(k, nb, block // 2)
    zp = np.zeros((k, -(-nb // 2)), np.uint8)
    inits = [helper.make_tensor("B", TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True),
             helper.make_tensor("S", TensorProto.FLOAT, [k * nb], np.ones(k * nb, np.float32)),
             helper.make_tensor("Z", TensorProto.UINT8, zp.shape, zp.tobytes(), raw=True)]
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=k, bits=4,
                            block_size=block, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, k])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("k,block", [(128, 32), (256, 64), (256, 128), (64, 16), (96, 64)])
def test_ort_matmulnbits_level4_activation_numerics(k, block):
    pytest.importorskip("onnxruntime")
    sess = _matmulnbits_identity(k, block, 4)
    rng = np.random.default_rng(k + block)
    x = np.concatenate([_activation_data(k if k % 32 == 0 else 128, block)[:, :k][:300],
                        _discriminating(20, k, block, rng)])
    spec = bw.ort_matmulnbits_level4(block)
    for m in (1, x.shape[0]):  # one row (M = 1 kernels) and many
        y = np.concatenate([sess.run(None, {"A": x[i:i + m]})[0] for i in range(0, x.shape[0], m)])
        codes, d = bw.quantize_act_blocks(torch.from_numpy(x), spec)
        ours = bw.dequantize_act_blocks(codes, d, block).numpy()
        assert np.array_equal(ours, y), f"M={m}: {(ours != y).sum()} of {y.size} differ"
    # the data tells the candidates apart: fp16 scales, 1/d, or half-away rounding all differ
    for wrong in (spec._replace(scale_dtype="float16"), spec._replace(reciprocal="1/d"),
                  spec._replace(rounding="away")):
        c2, d2 = bw.quantize_act_blocks(torch.from_numpy(x), wrong)
        assert not np.array_equal(bw.dequantize_act_blocks(c2, d2, block).numpy(), y), wrong


# ----------------------------------------------------------------------------- gradients and shapes

def test_activation_ste_is_identity_and_ignores_amax():
    x = torch.randn(3, 5, 64, dtype=torch.float32, requires_grad=True)
    g = torch.randn(3, 5, 64)
    y = bw.fake_quant_act_blocks(x, bw.LLAMA_CPP_X86_Q8_0)
    codes, d = bw.quantize_act_blocks(x.detach(), bw.LLAMA_CPP_X86_Q8_0)
    assert torch.equal(y.detach(), bw.dequantize_act_blocks(codes, d, 32))
    (y * g).sum().backward()
    assert torch.equal(x.grad, g)


def test_activation_partial_last_block_uses_its_own_amax():
    x = torch.zeros(1, 40)
    x[0, :32] = 100.0
    x[0, 32:] = torch.linspace(-1.0, 1.0, 8)
    codes, d = bw.quantize_act_blocks(x, bw.ort_matmulnbits_level4(32))
    assert d.shape == (1, 2) and float(d[0, 1]) == pytest.approx(1.0 / 127.0)
    assert int(codes[0, 32]) == -127 and int(codes[0, 39]) == 127


def test_activation_keeps_dtype_and_shape():
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = bw.fake_quant_act_blocks(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_learned_weight_gradients(fmt):
    qmin, qmax = bw.FORMATS[fmt]
    torch.manual_seed(0)
    w = torch.randn(4, 64, requires_grad=True)
    d0 = bw.initial_block_scale(w.detach(), fmt)
    d = (d0 * 0.7).requires_grad_(True)  # a smaller step: some weights fall outside the grid
    g = torch.randn(4, 64)
    y = bw.fake_quant_weight_learned(w, d, fmt)
    (y * g).sum().backward()
    assert torch.equal(w.grad, g)  # plain straight-through to the weight
    ds = d.detach().to(torch.float16).to(torch.float32)
    v = w.detach().reshape(4, 2, 32) / ds.unsqueeze(-1)
    q = torch.round(v).clamp(qmin, qmax)
    assert torch.equal(y.detach().reshape(4, 2, 32), q * ds.unsqueeze(-1))
    outside = (v < qmin) | (v > qmax)
    assert bool(outside.any()) and bool((~outside).any())
    dv = torch.where(outside, q, q - v)
    expect = (g.reshape(4, 2, 32) * dv).sum(-1) / (32 * qmax) ** 0.5
    assert torch.allclose(d.grad, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_learned_codes_are_what_the_fake_quant_computes(fmt):
    torch.manual_seed(1)
    w = torch.randn(8, 96)
    d = bw.initial_block_scale(w, fmt) * torch.empty(8, 3).uniform_(0.6, 1.1)
    d[0, 0] = -d[0, 0]  # a negative (mirrored) scale is allowed
    codes, scales = bw.weight_codes_learned(w, d, fmt)
    assert scales.dtype == torch.float16 and codes.dtype == torch.int8
    assert int(codes.min()) >= bw.FORMATS[fmt][0] and int(codes.max()) <= bw.FORMATS[fmt][1]
    assert torch.equal(bw.dequantize_weight_blocks(codes, scales), bw.fake_quant_weight_learned(w, d, fmt))
    QuantBlocks(codes, scales, fmt).check()


def test_storable_scale_keeps_sign_and_bounds():
    d = torch.tensor([0.0, -1e-12, 1e9, -0.1234567])
    s = bw.storable_scale(d)
    assert torch.equal(s, s.to(torch.float16).to(torch.float32))
    assert s[0] > 0 and s[1] < 0 and float(s[2]) == 65504.0 and s[3] < 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        bw.weight_codes_from_float(torch.randn(4, 40), "q8_0")
    with pytest.raises(ValueError, match="fmt='q5_0'"):
        bw.weight_codes_from_float(torch.randn(4, 64), "q5_0")
    with pytest.raises(ValueError, match="one scale per block"):
        bw.fake_quant_weight_learned(torch.randn(4, 64), torch.ones(4, 3), "q4_0")
    with pytest.raises(ValueError, match="rounding='nearest'"):
        bw.quantize_act_blocks(torch.randn(2, 32), bw.BlockActSpec(32, "float16", "127/amax", "nearest"))
    with pytest.raises(ValueError, match="block=0"):
        bw.quantize_act_blocks(torch.randn(2, 32), bw.BlockActSpec(0))
    with pytest.raises(ValueError, match="block=48"):
        bw.ort_matmulnbits_level4(48)
    with pytest.raises(ValueError, match="codes must lie"):
        QuantBlocks(torch.full((1, 32), 9, dtype=torch.int8), torch.ones(1, 1, dtype=torch.float16), "q4_0").check()

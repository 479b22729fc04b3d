"""tensorgpu.testing: random GGUF blocks that gguf.quants.dequantize reads back at about the
asked-for scale, and clear errors for what it cannot make."""
import gguf
import numpy as np
import pytest

from tensorgpu import dtypes
from tensorgpu.testing import q4_k_m_like_type, random_blocks


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k", "q4_0", "q8_0", "q5_0", "q4_1", "q5_1"])
def test_random_blocks_scale(kind):
    dt = dtypes.as_dtype(kind)
    raw = random_blocks(kind, (16, 512), 0.05, np.random.default_rng(0))
    assert raw.shape == (16, 512 // dt.block_size * dt.block_bytes) and raw.dtype == np.uint8
    w = np.asarray(gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType(dt.ggml_type)))
    assert w.size == 16 * 512 and np.isfinite(w).all()
    assert 0.05 / 4 < w.std() < 0.05 * 4, f"{kind}: std {w.std():.3g} for 0.05 asked"


def test_random_blocks_errors():
    with pytest.raises(ValueError, match="float16"):
        random_blocks("float16", (4, 256), 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(4, 100\).*block size 256"):
        random_blocks("q4_k", (4, 100), 1.0, np.random.default_rng(0))


def test_q4_k_m_like_types():
    assert q4_k_m_like_type("blk.3.ffn_down.weight") == "q6_k"
    assert q4_k_m_like_type("blk.1.ffn_down.weight") == "q4_k"
    assert q4_k_m_like_type("blk.0.attn_qkv.weight") == "q5_k"
    assert q4_k_m_like_type("blk.2.attn_qkv.weight") == "q4_k"
    assert q4_k_m_like_type("blk.2.attn_qkv.bias") is None
    assert q4_k_m_like_type("output_norm.weight") is None


def test_random_blocks_spread():
    """spread > 1 gives every block its own scale, within [std/spread, std*spread] of the base."""
    raw = random_blocks("q4_0", (64, 256), 0.05, np.random.default_rng(1), spread=7.0)
    d = np.abs(raw.reshape(-1, 18)[:, :2].copy().view(np.float16).astype(np.float64).ravel())
    assert d.max() / d.min() > 10 and (d <= 0.05 / 8 * 7 * 1.01).all() and (d >= 0.05 / 8 / 7 * 0.99).all()

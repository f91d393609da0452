"""Triton kernels for the branch convolutions of a Pyramid Squeeze Attention module

A PSA module runs N convolutions over the same input: branch ``i`` has an odd kernel ``k_i``,
``g_i`` groups, the module's stride and dilation, and same padding ``dilation * (k_i - 1) // 2``.
Its outputs are concatenated on channels, last branch first (the authors' order).
:func:`psa_branch_convs_reference` is that function in plain PyTorch; the kernels here compute it,
forward and both gradients, as implicit GEMMs on NHWC tensors.

Why custom kernels: the grouped large-kernel branches have 1-16 output channels per group. cuDNN
runs them at a few TFLOP/s and converts layouts around them (see the project's GPU notes). A
tensor-core ``tl.dot`` needs M, N, K >= 16, so one group alone cannot feed it.

Tiling (the same idea in all three kernels): a tile of output channels ``[n0, n0 + BLOCK_N)`` of a
branch covers a run of consecutive groups, and those groups read a contiguous run of input
channels. The program loads that run of input channels for its pixels (BLOCK_M rows) and the
weights of the tile as a dense (input channels x output channels) block that is zero wherever the
input channel's group differs from the output channel's: the weights are block-diagonal inside the
tile, so one ``tl.dot`` computes several small groups at once. Zeros cost tensor-core cycles, not
memory traffic; for dense branches (one group) the block is full and this is an ordinary implicit
GEMM.

- Forward (``_fwd_kernel``): program (pixel tile, output-channel tile, branch). For every kernel
  tap it loads the tile's input channels at the shifted pixels (zero outside the image) and
  accumulates ``x_tap @ w_tap`` in fp32; it writes straight into the branch's channel slice of the
  concatenated NHWC output. All branches go in one launch (each branch's shape is read from a small
  table), and the grid orders programs pixel tile first, so the programs of all branches over one
  pixel tile run side by side: the input tile is read from memory once and shared through L2.
- Input gradient (``_dx_kernel``): program (input pixel tile, input-channel tile), one launch. It loops over
  the branches and their taps, gathers the output gradient at the pixels that tap reached
  (a transposed convolution; with stride 2 only the taps whose offset divides evenly count), and
  sums every branch into one fp32 accumulator: one write of ``dx`` for the whole module.
- Weight gradient (``_dw_kernel``): program (pixel split, branch, tap, output-channel tile x
  input-channel chunk). It reduces ``x_tap^T @ dy`` over its share of the pixels and keeps the
  block-diagonal entries. The pixel reduction is split (split-K) into partial sums that PyTorch
  adds, so small layers with big feature maps still fill the GPU, deterministically.

fp32 inputs use TF32 tensor cores when ``torch.backends.cudnn.allow_tf32`` is on (PyTorch's
switch for convolutions) and IEEE fp32 when it is off; fp16/bf16 accumulate in fp32. NCHW inputs
are converted to NHWC (channels_last) around the kernels and the result converted back.

The kernels are ``torch.library`` custom ops (``timm_epsanet::psa_branch_convs`` and its two
backward ops) with fake implementations, so ``torch.compile`` traces through them. On a CPU, set
``TRITON_INTERPRET=1`` to run them in Triton's interpreter (slow; the tests do this).
"""

import functools
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .common import same_padding

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without Triton; the kernels then report why they cannot run
    triton = None
    tl = None

__all__ = [
    'psa_branch_convs_triton',
    'psa_branch_convs_reference',
    'triton_unavailable_reason',
]

_META_COLS = 6  # per branch: kernel size, in/out channels per group, out channels, out channel offset, weight offset


def psa_branch_convs_reference(
    x: torch.Tensor, weights: Sequence[torch.Tensor], groups: Sequence[int], stride: int, dilation: int
) -> torch.Tensor:
    """What the kernels compute: every branch's same-padded conv, concatenated last branch first."""
    feats = [
        F.conv2d(x, w, None, stride, same_padding(w.shape[-1], dilation), dilation, g)
        for w, g in reversed(list(zip(weights, groups, strict=True)))
    ]
    return torch.cat(feats, 1)


def _interpreting() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0').lower() in ('1', 'true', 'on', 'yes')


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the Triton kernels can run on ``device``, else a one-line reason why not."""
    device = torch.device(device)
    if triton is None:
        return 'Triton is not installed (pip install triton)'
    if device.type == 'cpu' and _interpreting():
        return None
    if device.type != 'cuda':
        return (
            f'the Triton kernels run on CUDA devices, not {device.type} '
            '(set TRITON_INTERPRET=1 to run them in the Triton interpreter on CPU)'
        )
    if not torch.cuda.is_available():
        return 'CUDA is not available to PyTorch'
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:  # bf16 and TF32 tensor-core dots need Ampere or newer
        return f'the Triton kernels need a GPU of compute capability 8.0 or newer (found {major}.{minor})'
    return None


# --------------------------------------------------------------------------------------------------
# Kernels. Defined only where Triton imports; decorated lazily (see _kernels) because whether
# triton.jit builds a GPU kernel or an interpreted one is decided when it decorates. They call
# only builtins of triton.language (tl.full, not tl.zeros or tl.cdiv, which are themselves
# @triton.jit functions and would not run in an interpreter started after Triton's import).
# --------------------------------------------------------------------------------------------------

if triton is not None:

    def _fwd_kernel(
        x_ptr,  # (B, H, W, CIN) contiguous
        w_ptr,  # all branches' weights, each as (k * k, CIN / g, COUT) contiguous, concatenated flat
        y_ptr,  # (B, HO, WO, COUT_TOT) contiguous: the concatenated output
        meta_ptr,  # (NB, _META_COLS) int32 branch table
        NB,  # number of branches
        H,
        W,
        CIN,
        HO,
        WO,
        COUT_TOT,
        M,  # B * HO * WO output pixels
        LAYOUT_KEY,  # autotuning key only: the branches' kernel sizes and groups
        WIDEST_N,  # channels of the widest tile dimension (also prunes the autotune configs)
        STRIDE: tl.constexpr,
        DIL: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOT_UPCAST: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong, so dot in fp32 there
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # 1-D grid, pixel tile slowest: the programs of every branch and channel tile over one pixel
        # tile run side by side, so the input tile comes from HBM once and from L2 after that.
        n_tiles = (WIDEST_N + BLOCK_N - 1) // BLOCK_N
        pid = tl.program_id(0)
        pid_m = pid // (NB * n_tiles)
        branch = (pid // n_tiles) % NB
        pid_n = pid % n_tiles
        meta = meta_ptr + branch * 6
        ksize = tl.load(meta + 0)
        cin_g = tl.load(meta + 1)
        cout_g = tl.load(meta + 2)
        cout = tl.load(meta + 3)
        c_off = tl.load(meta + 4)
        w_off = tl.load(meta + 5)
        n0 = pid_n * BLOCK_N
        if n0 < cout:  # the grid is sized for the widest branch
            pad = DIL * (ksize - 1) // 2
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            ow = offs_m % WO
            oh = (offs_m // WO) % HO
            b = (offs_m // (WO * HO)).to(tl.int64)

            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < cout
            grp_n = offs_n // cout_g
            # The tile's groups read one contiguous run of input channels.
            ci_lo = (n0 // cout_g) * cin_g
            ci_hi = ((tl.minimum(n0 + BLOCK_N, cout) - 1) // cout_g + 1) * cin_g

            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            # One flat loop over (tap, channel chunk) so that Triton pipelines the loads across taps.
            chunks = (ci_hi - ci_lo + BLOCK_K - 1) // BLOCK_K
            for it in range(0, ksize * ksize * chunks):
                tap = it // chunks
                kh = tap // ksize
                kw = tap % ksize
                ih = oh * STRIDE - pad + kh * DIL
                iw = ow * STRIDE - pad + kw * DIL
                pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                x_row = tl.where(pix_ok, ((b * H + ih) * W + iw) * CIN, 0)
                offs_k = ci_lo + (it - tap * chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
                k_ok = offs_k < ci_hi
                a = tl.load(
                    x_ptr + x_row[:, None] + tl.where(k_ok, offs_k, 0)[None, :],
                    mask=pix_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                # Block-diagonal weights: zero where the input channel is in another group.
                w_ok = k_ok[:, None] & n_ok[None, :] & ((offs_k // cin_g)[:, None] == grp_n[None, :])
                w_idx = w_off + (tap * cin_g + offs_k[:, None] - grp_n[None, :] * cin_g) * cout + offs_n[None, :]
                wt = tl.load(w_ptr + tl.where(w_ok, w_idx, 0), mask=w_ok, other=0.0)
                if DOT_UPCAST:  # exact: bf16 -> fp32 loses nothing, and the sum is fp32 either way
                    acc += tl.dot(a.to(tl.float32), wt.to(tl.float32), input_precision='ieee')
                else:
                    acc += tl.dot(a, wt, input_precision=DOT_PRECISION)

            y_idx = offs_m.to(tl.int64)[:, None] * COUT_TOT + c_off + offs_n[None, :]
            y_ok = m_ok[:, None] & n_ok[None, :]
            tl.store(y_ptr + tl.where(y_ok, y_idx, 0), acc.to(y_ptr.dtype.element_ty), mask=y_ok)

    def _dx_kernel(
        dy_ptr,  # (B, HO, WO, COUT_TOT) contiguous
        w_ptr,  # as in _fwd_kernel
        dx_ptr,  # (B, H, W, CIN) contiguous
        meta_ptr,
        NB,  # number of branches
        H,
        W,
        CIN,
        HO,
        WO,
        COUT_TOT,
        M,  # B * ceil(H / STRIDE) * ceil(W / STRIDE): input pixels of one stride phase
        LAYOUT_KEY,  # autotuning key only: the branches' kernel sizes and groups
        WIDEST_N,  # channels of the widest tile dimension (also prunes the autotune configs)
        STRIDE: tl.constexpr,
        DIL: tl.constexpr,
        TAP_STEP: tl.constexpr,  # STRIDE / gcd(DIL, STRIDE): distance between the taps of one phase
        DOT_PRECISION: tl.constexpr,
        DOT_UPCAST: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong, so dot in fp32 there
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # With stride S an input row ih receives gradient only from taps kh with (ih + pad - kh * DIL)
        # divisible by S, and which taps those are depends only on ih mod S. So each program takes
        # input pixels of one phase (ih mod S, iw mod S) and loops over that phase's taps alone,
        # instead of masking S*S - 1 of every S*S tap loads away.
        # 1-D grid: pixel tile slowest, then phase, then channel tile (neighbours share dy in L2).
        n_tiles = (WIDEST_N + BLOCK_N - 1) // BLOCK_N
        pid = tl.program_id(0)
        pid_m = pid // (STRIDE * STRIDE * n_tiles)
        phase = (pid // n_tiles) % (STRIDE * STRIDE)
        pid_n = pid % n_tiles
        ph = phase // STRIDE
        pw = phase % STRIDE
        hc = (H + STRIDE - 1) // STRIDE
        wc = (W + STRIDE - 1) // STRIDE
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        iw = (offs_m % wc) * STRIDE + pw
        ih = ((offs_m // wc) % hc) * STRIDE + ph
        b = (offs_m // (wc * hc)).to(tl.int64)
        m_ok = (offs_m < M) & (ih < H) & (iw < W)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)  # input channels
        n_ok = offs_n < CIN
        n_last = tl.minimum(n0 + BLOCK_N, CIN) - 1

        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for branch in range(0, NB):
            meta = meta_ptr + branch * 6
            ksize = tl.load(meta + 0)
            cin_g = tl.load(meta + 1)
            cout_g = tl.load(meta + 2)
            cout = tl.load(meta + 3)
            c_off = tl.load(meta + 4)
            w_off = tl.load(meta + 5)
            pad = DIL * (ksize - 1) // 2
            # This phase's taps: kh = kh0, kh0 + TAP_STEP, ...; likewise kw. kh0 is the first tap in
            # [0, STRIDE) that lands on an output row, if any (none: kh0 = ksize, so no taps).
            kh0 = ksize
            kw0 = ksize
            for t in tl.static_range(STRIDE):
                kh0 = tl.where(((ph + pad - t * DIL) % STRIDE == 0) & (kh0 == ksize), t, kh0)
                kw0 = tl.where(((pw + pad - t * DIL) % STRIDE == 0) & (kw0 == ksize), t, kw0)
            kh_count = tl.maximum(ksize - kh0 + TAP_STEP - 1, 0) // TAP_STEP
            kw_count = tl.maximum(ksize - kw0 + TAP_STEP - 1, 0) // TAP_STEP
            grp_n = offs_n // cin_g
            ci_local = offs_n - grp_n * cin_g
            # Output channels of the groups this tile of input channels belongs to.
            co_lo = (n0 // cin_g) * cout_g
            co_hi = (n_last // cin_g + 1) * cout_g
            chunks = (co_hi - co_lo + BLOCK_K - 1) // BLOCK_K
            for it in range(0, kh_count * kw_count * chunks):  # flat over (tap, chunk), as in _fwd_kernel
                tap_i = it // chunks
                kh = kh0 + (tap_i // kw_count) * TAP_STEP
                kw = kw0 + (tap_i % kw_count) * TAP_STEP
                oh = (ih + pad - kh * DIL) // STRIDE  # exact: the phase picked kh so that it divides
                ow = (iw + pad - kw * DIL) // STRIDE
                pix_ok = m_ok & (ih + pad - kh * DIL >= 0) & (iw + pad - kw * DIL >= 0) & (oh < HO) & (ow < WO)
                dy_row = tl.where(pix_ok, ((b * HO + oh) * WO + ow) * COUT_TOT + c_off, 0)
                offs_k = co_lo + (it - tap_i * chunks) * BLOCK_K + tl.arange(0, BLOCK_K)  # this branch's outputs
                k_ok = offs_k < co_hi
                a = tl.load(
                    dy_ptr + dy_row[:, None] + tl.where(k_ok, offs_k, 0)[None, :],
                    mask=pix_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                w_ok = k_ok[:, None] & n_ok[None, :] & ((offs_k // cout_g)[:, None] == grp_n[None, :])
                w_idx = w_off + ((kh * ksize + kw) * cin_g + ci_local[None, :]) * cout + offs_k[:, None]
                wt = tl.load(w_ptr + tl.where(w_ok, w_idx, 0), mask=w_ok, other=0.0)
                if DOT_UPCAST:  # exact: bf16 -> fp32 loses nothing, and the sum is fp32 either way
                    acc += tl.dot(a.to(tl.float32), wt.to(tl.float32), input_precision='ieee')
                else:
                    acc += tl.dot(a, wt, input_precision=DOT_PRECISION)

        dx_idx = ((b * H + ih) * W + iw)[:, None] * CIN + offs_n[None, :]
        dx_ok = m_ok[:, None] & n_ok[None, :]
        tl.store(dx_ptr + tl.where(dx_ok, dx_idx, 0), acc.to(dx_ptr.dtype.element_ty), mask=dx_ok)

    def _dw_kernel(
        x_ptr,  # (B, H, W, CIN) contiguous
        dy_ptr,  # (B, HO, WO, COUT_TOT) contiguous
        dw_ptr,  # (SPLIT, TOTAL_W) fp32 partial sums, layout of w_ptr in _fwd_kernel per split
        meta_ptr,
        H,
        W,
        CIN,
        HO,
        WO,
        COUT_TOT,
        P,  # B * HO * WO output pixels, the reduction
        TOTAL_W,
        PIX_PER_SPLIT,
        SPLIT,  # pixel splits (autotuning key; the grid carries them)
        NB,
        MAX_TAPS,
        LAYOUT_KEY,  # autotuning key only: the branches' kernel sizes and groups
        WIDEST_N,  # channels of the widest tile dimension (also prunes the autotune configs)
        STRIDE: tl.constexpr,
        DIL: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOT_UPCAST: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong, so dot in fp32 there
        BLOCK_CO: tl.constexpr,
        BLOCK_CI: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        # 1-D grid over (pixel split, branch, tap, channel tile), split slowest: the programs reading
        # one range of pixels (at every tap and branch) run side by side and share it in L2.
        ci_chunks = (CIN + BLOCK_CI - 1) // BLOCK_CI  # input-channel chunks of a tile, at most
        tiles = (WIDEST_N + BLOCK_CO - 1) // BLOCK_CO * ci_chunks
        pid = tl.program_id(0)
        split = pid // (NB * MAX_TAPS * tiles)
        branch = (pid // (MAX_TAPS * tiles)) % NB
        tap = (pid // tiles) % MAX_TAPS
        pid0 = pid % tiles
        meta = meta_ptr + branch * 6
        ksize = tl.load(meta + 0)
        cin_g = tl.load(meta + 1)
        cout_g = tl.load(meta + 2)
        cout = tl.load(meta + 3)
        c_off = tl.load(meta + 4)
        w_off = tl.load(meta + 5)
        co0 = (pid0 // ci_chunks) * BLOCK_CO
        ci_lo = (co0 // cout_g) * cin_g
        ci_hi = ((tl.minimum(co0 + BLOCK_CO, cout) - 1) // cout_g + 1) * cin_g
        ci0 = ci_lo + (pid0 % ci_chunks) * BLOCK_CI
        # The grid is sized for the widest branch and the biggest kernel.
        if (co0 < cout) & (tap < ksize * ksize) & (ci0 < ci_hi):
            pad = DIL * (ksize - 1) // 2
            kh = tap // ksize
            kw = tap % ksize
            offs_co = co0 + tl.arange(0, BLOCK_CO)
            co_ok = offs_co < cout
            offs_ci = ci0 + tl.arange(0, BLOCK_CI)
            ci_ok = offs_ci < ci_hi
            ci_safe = tl.where(ci_ok, offs_ci, 0)
            co_safe = tl.where(co_ok, offs_co, 0)

            acc = tl.full((BLOCK_CI, BLOCK_CO), 0.0, tl.float32)
            p_lo = split * PIX_PER_SPLIT
            p_hi = tl.minimum(p_lo + PIX_PER_SPLIT, P)
            for p0 in range(p_lo, p_hi, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                p_ok = offs_p < p_hi
                ow = offs_p % WO
                oh = (offs_p // WO) % HO
                b = (offs_p // (WO * HO)).to(tl.int64)
                ih = oh * STRIDE - pad + kh * DIL
                iw = ow * STRIDE - pad + kw * DIL
                x_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                x_row = tl.where(x_ok, ((b * H + ih) * W + iw) * CIN, 0)
                xt = tl.load(x_ptr + x_row[None, :] + ci_safe[:, None], mask=ci_ok[:, None] & x_ok[None, :], other=0.0)
                dy_row = tl.where(p_ok, offs_p.to(tl.int64) * COUT_TOT + c_off, 0)
                dyt = tl.load(
                    dy_ptr + dy_row[:, None] + co_safe[None, :], mask=p_ok[:, None] & co_ok[None, :], other=0.0
                )
                if DOT_UPCAST:  # exact: bf16 -> fp32 loses nothing, and the sum is fp32 either way
                    acc += tl.dot(xt.to(tl.float32), dyt.to(tl.float32), input_precision='ieee')
                else:
                    acc += tl.dot(xt, dyt, input_precision=DOT_PRECISION)

            # Keep the block-diagonal entries: input channel and output channel in the same group.
            grp_co = offs_co // cout_g
            keep = ci_ok[:, None] & co_ok[None, :] & ((offs_ci // cin_g)[:, None] == grp_co[None, :])
            w_idx = w_off + (tap * cin_g + offs_ci[:, None] - grp_co[None, :] * cin_g) * cout + offs_co[None, :]
            dst = dw_ptr + split.to(tl.int64) * TOTAL_W + tl.where(keep, w_idx, 0)
            tl.store(dst, acc, mask=keep)


# --------------------------------------------------------------------------------------------------
# Autotuning configurations. Small tiles suit these layers (16-128 output channels per branch);
# every config obeys tl.dot's >= 16 rule and is pruned when its pipelined tiles would not fit the
# device's shared memory (so the same list is sane on an A100 or a consumer card).
# --------------------------------------------------------------------------------------------------


def _config(num_warps: int, num_stages: int, **blocks: int):
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)


def _gemm_configs() -> List:
    """Configs of the forward and input-gradient kernels (BLOCK_M pixels x BLOCK_N channels, BLOCK_K)."""
    return [
        _config(4, 3, BLOCK_M=64, BLOCK_N=16, BLOCK_K=32),
        _config(4, 3, BLOCK_M=128, BLOCK_N=16, BLOCK_K=64),
        _config(4, 3, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32),
        _config(4, 3, BLOCK_M=128, BLOCK_N=32, BLOCK_K=32),
        _config(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
        _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
    ]


def _dx_configs() -> List:
    """The input gradient's K is the output channels of a tile's groups: few in grouped branches, so also BLOCK_K=16."""
    return _gemm_configs() + [
        _config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16),
        _config(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=16),
    ]


def _dw_configs() -> List:
    """Configs of the weight-gradient kernel (BLOCK_CI x BLOCK_CO tile, BLOCK_P pixels per step)."""
    return [
        _config(4, 3, BLOCK_CO=16, BLOCK_CI=32, BLOCK_P=64),
        _config(4, 3, BLOCK_CO=16, BLOCK_CI=64, BLOCK_P=64),
        _config(4, 3, BLOCK_CO=32, BLOCK_CI=64, BLOCK_P=64),
        _config(4, 4, BLOCK_CO=64, BLOCK_CI=64, BLOCK_P=32),
        _config(8, 3, BLOCK_CO=128, BLOCK_CI=64, BLOCK_P=32),
    ]


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _max_shared_memory() -> int:
    """Shared memory per block of the current device (the H100 has ~227 KiB, an A100 ~163, consumer cards ~99)."""
    try:
        device = torch.cuda.current_device()
        return int(triton.runtime.driver.active.utils.get_device_properties(device)['max_shared_mem'])
    except Exception:  # no driver (interpreter, compile-only): assume the smallest common budget
        return 99 * 1024


def _smem_bytes(config, elem_bytes: int, a: Tuple[str, str], b: Tuple[str, str]) -> int:
    """Shared memory of a pipelined tl.dot: num_stages copies of both operand tiles."""
    kw = config.kwargs
    return config.num_stages * (kw[a[0]] * kw[a[1]] + kw[b[0]] * kw[b[1]]) * elem_bytes


def _prune_gemm(configs, named_args, **kwargs):
    """Drop configs wider than the widest channel tile needed or too big for shared memory."""
    widest = named_args['WIDEST_N']
    elem = named_args['x_ptr'].element_size() if 'x_ptr' in named_args else named_args['dy_ptr'].element_size()
    budget = _max_shared_memory()
    keep = [
        c
        for c in configs
        if c.kwargs['BLOCK_N'] <= max(16, _next_pow2(widest))
        and _smem_bytes(c, elem, ('BLOCK_M', 'BLOCK_K'), ('BLOCK_K', 'BLOCK_N')) <= budget
    ]
    return keep or configs[:1]


def _prune_dw(configs, named_args, **kwargs):
    widest = named_args['WIDEST_N']
    elem = named_args['x_ptr'].element_size()
    budget = _max_shared_memory()
    keep = [
        c
        for c in configs
        if c.kwargs['BLOCK_CO'] <= max(16, _next_pow2(widest))
        and _smem_bytes(c, elem, ('BLOCK_CI', 'BLOCK_P'), ('BLOCK_P', 'BLOCK_CO')) <= budget
    ]
    return keep or configs[:1]


_GEMM_KEY = ['H', 'W', 'CIN', 'HO', 'WO', 'COUT_TOT', 'M', 'STRIDE', 'DIL', 'DOT_PRECISION', 'LAYOUT_KEY']
_DW_KEY = ['H', 'W', 'CIN', 'HO', 'WO', 'COUT_TOT', 'P', 'SPLIT', 'STRIDE', 'DIL', 'DOT_PRECISION', 'LAYOUT_KEY']


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> Dict[str, object]:
    """The kernels decorated for the GPU or the interpreter (triton.jit decides when it decorates)."""
    assert interpret == _interpreting()
    kernels = {}
    for name, fn, configs, key, prune in (
        ('fwd', _fwd_kernel, _gemm_configs(), _GEMM_KEY, _prune_gemm),
        ('dx', _dx_kernel, _dx_configs(), _GEMM_KEY, _prune_gemm),
        ('dw', _dw_kernel, _dw_configs(), _DW_KEY, _prune_dw),
    ):
        jitted = triton.jit(do_not_specialize=['LAYOUT_KEY', 'WIDEST_N'])(fn)
        kernels[name] = jitted
        kernels[name + '_tuned'] = triton.autotune(configs, key=key, prune_configs_by={'early_config_prune': prune})(
            jitted
        )
        kernels[name + '_configs'] = configs
    return kernels


# --------------------------------------------------------------------------------------------------
# Launchers: pack the branches into the kernels' layout and launch (autotuned on a GPU; with one
# fixed config in the interpreter, where timing means nothing).
# --------------------------------------------------------------------------------------------------

# Config index per kernel used under TRITON_INTERPRET=1 (tests cycle through them).
_INTERPRETER_CONFIG = {'fwd': 0, 'dx': 0, 'dw': 0}
# The weight gradient splits its pixel reduction so that each program reduces about this many pixels.
_DW_PIXELS_PER_SPLIT = 4096
_DW_MAX_SPLIT = 64


class _Branches:
    """The branches of one PSA module in the kernels' terms: the int32 table and the flat weights."""

    def __init__(self, cin: int, weights: Sequence[torch.Tensor], groups: Sequence[int]):
        self.shapes = [
            (int(w.shape[0]), int(w.shape[1]), int(w.shape[-1]), int(g)) for w, g in zip(weights, groups, strict=True)
        ]
        couts = [s[0] for s in self.shapes]
        rows, w_off = [], 0
        for i, (cout, cin_g, k, g) in enumerate(self.shapes):
            c_off = sum(couts[i + 1 :])  # the authors' order: the last branch comes first
            rows.append([k, cin_g, cout // g, cout, c_off, w_off])
            w_off += k * k * cin_g * cout
        self.rows = rows
        self.total_w = w_off
        self.cout_total = sum(couts)
        self.widest = max(couts)
        self.max_taps = max(s[2] for s in self.shapes) ** 2
        self.layout_key = hash(tuple(self.shapes)) & 0x7FFFFFFF
        self.cin = cin

    def table(self, device: torch.device) -> torch.Tensor:
        return _branch_table(tuple(tuple(row) for row in self.rows), device)

    @staticmethod
    def flat_weights(weights: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each (COUT, CIN/g, k, k) weight as (k, k, CIN/g, COUT) so a tap's block is one contiguous slab."""
        return torch.cat([w.permute(2, 3, 1, 0).reshape(-1) for w in weights])

    def unflatten(self, flat: torch.Tensor) -> List[torch.Tensor]:
        out, start = [], 0
        for cout, cin_g, k, _ in self.shapes:
            n = k * k * cin_g * cout
            out.append(flat[start : start + n].view(k, k, cin_g, cout).permute(3, 2, 0, 1).contiguous())
            start += n
        return out


@functools.lru_cache(maxsize=256)
def _branch_table(rows: Tuple[Tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    # Cached per layer shape and device: a fresh host-to-device copy on every call would stall the host.
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _dot_options(dtype: torch.dtype, allow_tf32: bool) -> Dict[str, object]:
    # Only fp32 operands have a choice; for fp16/bf16 tl.dot's default is the tensor-core path.
    precision = 'tf32' if (dtype != torch.float32 or allow_tf32) else 'ieee'
    # Triton's interpreter (3.8) multiplies bf16 dot operands as garbage; fp32 there is exact.
    return dict(DOT_PRECISION=precision, DOT_UPCAST=_interpreting() and dtype == torch.bfloat16)


def _output_size(size: int, stride: int) -> int:
    # Odd kernels with same padding: every branch gives floor((size - 1) / stride) + 1.
    return (size - 1) // stride + 1


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1).contiguous()  # no copy for a channels_last tensor


def _launch(name: str, grid, *args, **constexprs) -> None:
    kernels = _kernels(_interpreting())
    if _interpreting():
        config = kernels[name + '_configs'][_INTERPRETER_CONFIG[name]]
        kernels[name][grid](*args, **constexprs, **config.all_kwargs())
    else:
        with torch.cuda.device(args[0].device):  # Triton launches on the current device
            kernels[name + '_tuned'][grid](*args, **constexprs)


def _forward_impl(x, weights, groups, stride, dilation, allow_tf32) -> torch.Tensor:
    branches = _Branches(x.shape[1], weights, groups)
    xh = _nhwc(x)
    batch, height, width, cin = xh.shape
    ho, wo = _output_size(height, stride), _output_size(width, stride)
    y = torch.empty((batch, ho, wo, branches.cout_total), dtype=x.dtype, device=x.device)
    m = batch * ho * wo
    if m > 0:

        def grid(meta):
            return (triton.cdiv(m, meta['BLOCK_M']) * triton.cdiv(branches.widest, meta['BLOCK_N']) * len(weights),)

        _launch(
            'fwd', grid,
            xh, _Branches.flat_weights(weights), y, branches.table(x.device), len(weights),
            height, width, cin, ho, wo, branches.cout_total, m, branches.layout_key, branches.widest,
            STRIDE=stride, DIL=dilation, **_dot_options(x.dtype, allow_tf32),
        )  # fmt: skip
    return y.permute(0, 3, 1, 2)


def _backward_input_impl(grad, x, weights, groups, stride, dilation, allow_tf32) -> torch.Tensor:
    branches = _Branches(x.shape[1], weights, groups)
    dyh = _nhwc(grad.to(x.dtype))
    batch, ho, wo, _ = dyh.shape
    height, width, cin = x.shape[2], x.shape[3], x.shape[1]
    dx = torch.empty((batch, height, width, cin), dtype=x.dtype, device=x.device)
    # pixels of one stride phase (see _dx_kernel)
    m = batch * triton.cdiv(height, stride) * triton.cdiv(width, stride)
    if m > 0:

        def grid(meta):
            return (triton.cdiv(m, meta['BLOCK_M']) * stride * stride * triton.cdiv(cin, meta['BLOCK_N']),)

        _launch(
            'dx', grid,
            dyh, _Branches.flat_weights(weights), dx, branches.table(x.device), len(weights),
            height, width, cin, ho, wo, branches.cout_total, m, branches.layout_key, cin,
            STRIDE=stride, DIL=dilation, TAP_STEP=stride // math.gcd(dilation, stride),
            **_dot_options(x.dtype, allow_tf32),
        )  # fmt: skip
    return dx.permute(0, 3, 1, 2)


def _backward_weight_impl(grad, x, weights, groups, stride, dilation, allow_tf32) -> List[torch.Tensor]:
    branches = _Branches(x.shape[1], weights, groups)
    xh = _nhwc(x)
    dyh = _nhwc(grad.to(x.dtype))
    batch, height, width, cin = xh.shape
    ho, wo = dyh.shape[1], dyh.shape[2]
    p = batch * ho * wo
    split = max(1, min(_DW_MAX_SPLIT, triton.cdiv(p, _DW_PIXELS_PER_SPLIT)))
    pix_per_split = max(1, triton.cdiv(p, split))
    partial = torch.empty((split, branches.total_w), dtype=torch.float32, device=x.device)

    def grid(meta):
        tiles = triton.cdiv(branches.widest, meta['BLOCK_CO']) * triton.cdiv(cin, meta['BLOCK_CI'])
        return (tiles * branches.max_taps * len(weights) * split,)

    _launch(
        'dw', grid,
        xh, dyh, partial, branches.table(x.device),
        height, width, cin, ho, wo, branches.cout_total, p, branches.total_w, pix_per_split, split,
        len(weights), branches.max_taps, branches.layout_key, branches.widest,
        STRIDE=stride, DIL=dilation, **_dot_options(x.dtype, allow_tf32),
    )  # fmt: skip
    grads = branches.unflatten(partial.sum(0))
    return [g.to(w.dtype) for g, w in zip(grads, weights, strict=True)]


# --------------------------------------------------------------------------------------------------
# Custom ops: what torch.compile traces (through the fake implementations) and autograd calls.
# --------------------------------------------------------------------------------------------------


def _nhwc_empty_like_nchw(ref: torch.Tensor, shape: Tuple[int, int, int, int]) -> torch.Tensor:
    """An NCHW-shaped tensor with channels_last strides, built the way the kernels' outputs are."""
    b, c, h, w = shape
    return ref.new_empty((b, h, w, c)).permute(0, 3, 1, 2)


@torch.library.custom_op('timm_epsanet::psa_branch_convs', mutates_args=())
def _psa_branch_convs_op(
    x: torch.Tensor, weights: List[torch.Tensor], groups: List[int], stride: int, dilation: int, allow_tf32: bool
) -> torch.Tensor:
    return _forward_impl(x, weights, groups, stride, dilation, allow_tf32)


@_psa_branch_convs_op.register_fake
def _(x, weights, groups, stride, dilation, allow_tf32):
    cout_total = sum(w.shape[0] for w in weights)
    ho, wo = _output_size(x.shape[2], stride), _output_size(x.shape[3], stride)
    return _nhwc_empty_like_nchw(x, (x.shape[0], cout_total, ho, wo))


@torch.library.custom_op('timm_epsanet::psa_branch_convs_backward_input', mutates_args=())
def _psa_branch_convs_backward_input_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weights: List[torch.Tensor],
    groups: List[int],
    stride: int,
    dilation: int,
    allow_tf32: bool,
) -> torch.Tensor:
    return _backward_input_impl(grad, x, weights, groups, stride, dilation, allow_tf32)


@_psa_branch_convs_backward_input_op.register_fake
def _(grad, x, weights, groups, stride, dilation, allow_tf32):
    return _nhwc_empty_like_nchw(x, tuple(x.shape))


@torch.library.custom_op('timm_epsanet::psa_branch_convs_backward_weight', mutates_args=())
def _psa_branch_convs_backward_weight_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weights: List[torch.Tensor],
    groups: List[int],
    stride: int,
    dilation: int,
    allow_tf32: bool,
) -> List[torch.Tensor]:
    return _backward_weight_impl(grad, x, weights, groups, stride, dilation, allow_tf32)


@_psa_branch_convs_backward_weight_op.register_fake
def _(grad, x, weights, groups, stride, dilation, allow_tf32):
    return [w.new_empty(w.shape) for w in weights]


def _any(needs) -> bool:
    return any(needs) if isinstance(needs, (list, tuple)) else bool(needs)


def _setup_context(ctx, inputs, output):
    x, weights, groups, stride, dilation, allow_tf32 = inputs
    ctx.save_for_backward(x, *weights)
    ctx.conv_args = (list(groups), stride, dilation, allow_tf32)


def _backward(ctx, grad):
    x, *weights = ctx.saved_tensors
    grad_x = grad_w = None
    if _any(ctx.needs_input_grad[0]):
        grad_x = _psa_branch_convs_backward_input_op(grad, x, weights, *ctx.conv_args)
    if _any(ctx.needs_input_grad[1]):
        grad_w = _psa_branch_convs_backward_weight_op(grad, x, weights, *ctx.conv_args)
    return grad_x, grad_w, None, None, None, None


_psa_branch_convs_op.register_autograd(_backward, setup_context=_setup_context)


def _check_args(x: torch.Tensor, weights: Sequence[torch.Tensor], groups: Sequence[int], stride: int, dilation: int):
    if x.dim() != 4:
        raise ValueError(f'psa_branch_convs_triton: expected a 4-D (B, C, H, W) input, got shape {tuple(x.shape)}')
    if len(weights) == 0 or len(weights) != len(groups):
        raise ValueError(f'psa_branch_convs_triton: {len(weights)} weights for {len(groups)} groups')
    if stride < 1 or dilation < 1:
        raise ValueError(f'psa_branch_convs_triton: stride {stride} and dilation {dilation} must be >= 1')
    for i, (w, g) in enumerate(zip(weights, groups, strict=True)):
        k = w.shape[-1]
        if w.dim() != 4 or w.shape[-2] != k or k % 2 == 0:
            raise ValueError(f'psa_branch_convs_triton: branch {i} weight {tuple(w.shape)} is not an odd square kernel')
        if g < 1 or x.shape[1] % g or w.shape[0] % g or w.shape[1] * g != x.shape[1]:
            raise ValueError(
                f'psa_branch_convs_triton: branch {i} weight {tuple(w.shape)} with {g} groups '
                f'does not fit {x.shape[1]} input channels'
            )
        if w.dtype != x.dtype or w.device != x.device:
            raise ValueError(
                f'psa_branch_convs_triton: branch {i} weight is {w.dtype} on {w.device}, input {x.dtype} on {x.device}'
            )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f'psa_branch_convs_triton: dtype {x.dtype} is not supported (float32, float16, bfloat16)')


def psa_branch_convs_triton(
    x: torch.Tensor, weights: Sequence[torch.Tensor], groups: Sequence[int], stride: int, dilation: int
) -> torch.Tensor:
    """All branch convolutions of a PSA module with the Triton kernels, concatenated last branch first.

    Computes :func:`psa_branch_convs_reference` (differentiable in ``x`` and every weight) and
    returns it in ``x``'s memory format. Under autocast the input and weights are cast to the
    autocast dtype first, as ``F.conv2d`` would be.

    Args:
        x: (B, Cin, H, W) input, NCHW or channels_last.
        weights: Branch weights (Cout_i, Cin / groups_i, k_i, k_i), odd k_i.
        groups: Groups of each branch.
        stride: Stride of every branch.
        dilation: Dilation of every branch; branch i is padded by ``dilation * (k_i - 1) // 2``.
    """
    reason = triton_unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f'psa_branch_convs_triton cannot run: {reason}')
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        weights = [w.to(dtype) for w in weights]
    _check_args(x, weights, groups, stride, dilation)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    allow_tf32 = bool(torch.backends.cudnn.allow_tf32)
    y = _psa_branch_convs_op(x, list(weights), [int(g) for g in groups], int(stride), int(dilation), allow_tf32)
    return y if channels_last else y.contiguous()

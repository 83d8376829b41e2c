"""Triton kernel of `torchopt.kernels.preprocess` and every decision about how it is launched.

Imported on the first Triton launch only (`import torchopt.kernels` must not import triton). Design notes and
measurements: benchmarks/results/preprocess_notes.md.

Math (per output pixel (y, x) of image n, in fp32; matches `preprocess_ref` / `F.interpolate`):

    ry, rx = y + off_y, x + off_x                     # position in the resized image (letterbox: off < 0)
    inside = 0 <= ry < nh and 0 <= rx < nw            # outside: the normalized pad value
    rgb    = resample(source, ry, rx)                 # nearest | bilinear | antialiased bilinear, fp32 0..255
    out[c] = rgb[c] * scale[c] + bias[c]              # scale = 1/(255 std), bias = -mean/std (host-rounded)

* nearest:   ``src = min(floor(dst * in/out), in - 1)``, PyTorch's legacy "nearest" (same fp32 product).
* bilinear:  ``src = max((dst + 0.5) * in/out - 0.5, 0)``, i0 = floor, i1 = min(i0 + 1, in - 1), then
  ``(1-ly)((1-lx) p00 + lx p01) + ly((1-lx) p10 + lx p11)``: F.interpolate(align_corners=False) to ~1e-5.
* antialias: PyTorch's `_upsample_bilinear2d_aa` (PIL's triangle filter): support = max(in/out, 1),
  center = (dst + 0.5) in/out, taps ``[trunc(center - support + .5), trunc(center + support + .5))``,
  weight ``max(0, 1 - |(j - center + .5) / max(in/out, 1)|)``; horizontal sums first, then vertical, then
  divided by the weights' total (PyTorch normalizes the weights first: the same up to fp32 rounding).
* copy: every image already has the resized size (normalize + layout only); one tap, exact for all three.
* YUV 4:2:0 (nv12 / i420): each tap converts its own pixel with the chroma sample (y//2, x//2) (nearest
  chroma, like OpenCV), ``R = cy max(Y - yo, 0) + crv (V-128)`` etc. (limited-range footroom is black, as in
  OpenCV), clamped to 0..255, then resampled.

Shapes, dtypes: source uint8 at ``src_ptr + frame + y*stride_h + x*stride_w (+ channel)``, any strides; one
int64 descriptor row per image (`_preprocess_layout`; a batch tensor shares row 0 and adds ``n * stride_src_n``;
a list of images of different sizes has one row each, with its byte offset from the first image), so a list is
one launch. Output fp32/fp16/bf16 at arbitrary (n, c, y, x) strides (NCHW, NHWC or the caller's `out=`); bf16 is
rounded to nearest even by hand, which the GPU cast does anyway and Triton's interpreter (it truncates) does not.

Design: one program = one BLOCK_Y x BLOCK_X output tile of one image, all 3 channels (coordinates and weights
once per pixel, stores coalesced along x). The kernel is bound by load instructions, not DRAM bytes, so packed
3-byte pixels are read as aligned 32-bit words (RGB24) or, for a plain copy, 64-bit words (COPY8).
"""

from __future__ import annotations

import contextlib
import math
import struct

import numpy as np
import torch
import triton
import triton.language as tl

from torchopt.kernels import _preprocess_layout as L
from torchopt.kernels._preprocess_common import (
    ParsedImages,
    PreprocessConfig,
    normalization_constants,
    output_shape,
    plan_geometry,
    yuv_coefficients,
)

# Output tiles (BLOCK_Y, BLOCK_X, num_warps), measured on the H100 (benchmarks/sweep_preprocess_tiles.py; results
# in benchmarks/results/logs/preprocess_tile_sweep_h100*.json): thin, wide tiles won for every resampling case;
# more, shorter-lived programs hide the latency of the dependent descriptor -> pixel loads.
TILE = (2, 128, 2)  # resampling, copy, nearest (RGB and YUV)
TILE_COPY8 = (16, 64, 4)  # COPY8: 16 x 64 pixels = 128 groups of 8, one per thread
# The interpreter runs programs one after another (cost grows with their number): larger tiles there.
INTERP_BLOCK_Y = 32
INTERP_BLOCK_X = 64

# The FORMAT / INTERP codes as host ints (declared in _preprocess_layout; a tl.constexpr compare is slow on the
# per-call path).
PACKED_RGB, YUV420, RGB24, BGR24 = (c.value for c in (L.PACKED_RGB, L.YUV420, L.RGB24, L.BGR24))
COPY, NEAREST, BILINEAR, ANTIALIAS, COPY8 = (c.value for c in (L.COPY, L.NEAREST, L.BILINEAR, L.ANTIALIAS, L.COPY8))
DESC_FIELDS = L.FIELDS.value
_LIST_TABLES_PER_PLAN = 16  # device descriptor tables of a list plan, one per set of image addresses

# Helpers stay few and out of the antialias tap loop: the interpreter re-patches triton.language on every
# nested @jit call (~4 ms each), which dominated the CPU test time.


@triton.jit
def _sample(src_ptr, frame, yy, xx, mask, layout, yuv, FORMAT: tl.constexpr):
    """(r, g, b) fp32 0..255 of source pixels (yy, xx) (int32, in bounds) of the image at `frame`.

    layout = (stride_h, stride_w, a, b, chroma pitch, chroma step) as in the descriptor (`_preprocess_layout`);
    yuv = the coefficients of `yuv_coefficients` (unused for packed RGB).
    """
    sh, sw, a, b, cpitch, cstep = layout
    yo, cy, crv, cgu, cgv, cbu = yuv
    # 64-bit: row * stride can pass 2**31 in a batch of 4K frames.
    pix = frame + yy.to(tl.int64) * sh + xx.to(tl.int64) * sw
    if FORMAT != L.YUV420:  # packed RGB/BGR: a = offset of R in the pixel, b = channel stride (negative for BGR)
        p = src_ptr + pix + a
        r = tl.load(p, mask=mask, other=0).to(tl.float32)
        g = tl.load(p + b, mask=mask, other=0).to(tl.float32)
        bl = tl.load(p + 2 * b, mask=mask, other=0).to(tl.float32)
    else:  # YUV 4:2:0, nearest chroma: a / b = U / V plane offsets
        cpix = frame + (yy >> 1).to(tl.int64) * cpitch + (xx >> 1).to(tl.int64) * cstep
        # Luma below black (limited-range footroom) is black, as in OpenCV.
        luma = tl.maximum(tl.load(src_ptr + pix, mask=mask, other=0).to(tl.float32) - yo, 0.0) * cy
        u = tl.load(src_ptr + cpix + a, mask=mask, other=128).to(tl.float32) - 128.0
        v = tl.load(src_ptr + cpix + b, mask=mask, other=128).to(tl.float32) - 128.0
        r = tl.clamp(luma + crv * v, 0.0, 255.0)
        g = tl.clamp(luma + cgu * u + cgv * v, 0.0, 255.0)
        bl = tl.clamp(luma + cbu * u, 0.0, 255.0)
    return r, g, bl


@triton.jit
def _pair_rgb24(src_ptr, row, xx, edge, mask, PAIR: tl.constexpr, REV: tl.constexpr):
    """(r0, g0, b0, r1, g1, b1) fp32 of the RGB24 pixel at column xx of the row at byte offset `row` and of
    the pixel after it (the same pixel where `edge`: the right border; PAIR=False: one pixel only).
    REV: the pixel's bytes are B, G, R (BGR input) instead of R, G, B. Needs a 4-byte aligned src_ptr.

    The 6 bytes from the pixel on lie in the 3 aligned 32-bit words covering them; the second and third are
    loaded only where the needed bytes reach into them, so every word read holds a byte of the image (an
    aligned word never crosses a page: no fault past its end). Two 32-bit funnel shifts (one SHF each) put the
    bytes in place and constant shifts extract them (the channel order is a constexpr): fewer instructions
    than a 64-bit funnel, which matters in this issue-bound kernel (measurements: preprocess_notes.md).
    """
    off = row + xx.to(tl.int64) * 3
    a4 = off & -4
    o4 = (off - a4).to(tl.int32)  # 0..3
    p = (src_ptr + a4).to(tl.pointer_type(tl.uint32))
    last = o4 + tl.where(edge, 2, 5) if PAIR else o4 + 2  # last byte needed, from the first word's start
    w0 = tl.load(p, mask=mask, other=0)
    w1 = tl.load(p + 1, mask=mask & (last >= 4), other=0)
    s = (8 * o4).to(tl.uint32)
    lo = tl.where(o4 == 0, w0, (w0 >> s) | (w1 << (32 - s)))  # bytes off .. off+3
    c0 = (lo & 0xFF).to(tl.float32)
    c1 = ((lo >> 8) & 0xFF).to(tl.float32)
    c2 = ((lo >> 16) & 0xFF).to(tl.float32)
    if PAIR:
        w2 = tl.load(p + 2, mask=mask & (last >= 8), other=0)
        hi = tl.where(o4 == 0, w1, (w1 >> s) | (w2 << (32 - s)))  # bytes off+4 .. off+7
        d0 = tl.where(edge, c0, (lo >> 24).to(tl.float32))
        d1 = tl.where(edge, c1, (hi & 0xFF).to(tl.float32))
        d2 = tl.where(edge, c2, ((hi >> 8) & 0xFF).to(tl.float32))
    else:
        d0, d1, d2 = c0, c1, c2
    if REV:
        return c2, c1, c0, d2, d1, d0
    return c0, c1, c2, d0, d1, d2


@triton.jit
def _copy8_rgb24(src_ptr, frame, sh, a, pid_x, pid_y, H, W, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    """(r, g, b) fp32 [BLOCK_Y, BLOCK_X] of the tile's source pixels (copy at zero offset), RGB24 with 8-byte
    aligned rows (frame, sh and src_ptr multiples of 8): a thread loads its 8 pixels as 3 aligned 64-bit words,
    extracts the 24 bytes with constant shifts and joins them back in x order, 8 pixels in its registers
    (16-byte fp16 stores). a = offset of R in a pixel: 0 (RGB) or 2 (BGR)."""
    G: tl.constexpr = BLOCK_X // 8
    gy = pid_y * BLOCK_Y + tl.arange(0, BLOCK_Y)[:, None]
    gx = pid_x * G + tl.arange(0, G)[None, :]
    npx = tl.minimum(tl.maximum(W - gx * 8, 0), 8)  # valid pixels of the group (right edge: fewer)
    ok = (gy < H) & (npx > 0)
    off = frame + tl.minimum(gy, H - 1).to(tl.int64) * sh + tl.minimum(gx * 24, (W - 1) * 3).to(tl.int64)
    p = (src_ptr + off).to(tl.pointer_type(tl.uint64))
    # A word is read only if it holds a byte of a valid pixel: never past the image (aligned: no page crossing).
    w0 = tl.load(p, mask=ok, other=0)
    w1 = tl.load(p + 1, mask=ok & (npx > 2), other=0)
    w2 = tl.load(p + 2, mask=ok & (npx > 5), other=0)
    # byte k of the group: word k // 8, bits 8 (k % 8); pixel j channel c (memory order) is byte 3 j + c.
    c0_0 = (w0 & 0xFF).to(tl.float32)
    c1_0 = ((w0 >> 8) & 0xFF).to(tl.float32)
    c2_0 = ((w0 >> 16) & 0xFF).to(tl.float32)
    c0_1 = ((w0 >> 24) & 0xFF).to(tl.float32)
    c1_1 = ((w0 >> 32) & 0xFF).to(tl.float32)
    c2_1 = ((w0 >> 40) & 0xFF).to(tl.float32)
    c0_2 = ((w0 >> 48) & 0xFF).to(tl.float32)
    c1_2 = ((w0 >> 56) & 0xFF).to(tl.float32)
    c2_2 = (w1 & 0xFF).to(tl.float32)
    c0_3 = ((w1 >> 8) & 0xFF).to(tl.float32)
    c1_3 = ((w1 >> 16) & 0xFF).to(tl.float32)
    c2_3 = ((w1 >> 24) & 0xFF).to(tl.float32)
    c0_4 = ((w1 >> 32) & 0xFF).to(tl.float32)
    c1_4 = ((w1 >> 40) & 0xFF).to(tl.float32)
    c2_4 = ((w1 >> 48) & 0xFF).to(tl.float32)
    c0_5 = ((w1 >> 56) & 0xFF).to(tl.float32)
    c1_5 = (w2 & 0xFF).to(tl.float32)
    c2_5 = ((w2 >> 8) & 0xFF).to(tl.float32)
    c0_6 = ((w2 >> 16) & 0xFF).to(tl.float32)
    c1_6 = ((w2 >> 24) & 0xFF).to(tl.float32)
    c2_6 = ((w2 >> 32) & 0xFF).to(tl.float32)
    c0_7 = ((w2 >> 40) & 0xFF).to(tl.float32)
    c1_7 = ((w2 >> 48) & 0xFF).to(tl.float32)
    c2_7 = ((w2 >> 56) & 0xFF).to(tl.float32)
    # Nested joins append a last dim each: [BLOCK_Y, G, 2 (j // 4), 2 (j // 2 % 2), 2 (j % 2)] -> x = 8 g + j.
    c0 = tl.join(tl.join(tl.join(c0_0, c0_4), tl.join(c0_2, c0_6)), tl.join(tl.join(c0_1, c0_5), tl.join(c0_3, c0_7)))
    c1 = tl.join(tl.join(tl.join(c1_0, c1_4), tl.join(c1_2, c1_6)), tl.join(tl.join(c1_1, c1_5), tl.join(c1_3, c1_7)))
    c2 = tl.join(tl.join(tl.join(c2_0, c2_4), tl.join(c2_2, c2_6)), tl.join(tl.join(c2_1, c2_5), tl.join(c2_3, c2_7)))
    c0 = tl.reshape(c0, [BLOCK_Y, BLOCK_X])
    c1 = tl.reshape(c1, [BLOCK_Y, BLOCK_X])
    c2 = tl.reshape(c2, [BLOCK_Y, BLOCK_X])
    bgr = a != 0
    return tl.where(bgr, c2, c0), c1, tl.where(bgr, c0, c2)


@triton.jit
def _linear_taps(r, scale, size):
    """PyTorch's area_pixel_compute_source_index(align_corners=False) + guard_index_and_lambda."""
    s = tl.maximum((r.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(s.to(tl.int32), size - 1)  # s >= 0: truncation is floor
    lam = tl.minimum(tl.maximum(s - i0.to(tl.float32), 0.0), 1.0)
    return i0, tl.minimum(i0 + 1, size - 1), lam


@triton.jit
def _aa_window(r, scale, support, size, taps):
    """Center, first tap and tap count of PyTorch's _compute_weights_aa (C++ casts truncate)."""
    center = scale * (r.to(tl.float32) + 0.5)
    lo = tl.maximum((center - support + 0.5).to(tl.int32), 0)
    n = tl.minimum((center + support + 0.5).to(tl.int32), size) - lo
    return center, lo, tl.minimum(tl.maximum(n, 0), taps)


@triton.jit
def _store(ptr, v, mask):
    """Cast fp32 `v` to the output dtype and store; bf16 rounds to nearest even on every backend."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)  # now exactly representable: the cast below is exact
    tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _preprocess_kernel(
    src_ptr,  # uint8: the batch tensor, or the first image of a list
    desc_ptr,  # int64 [rows, DESC_FIELDS]
    descf_ptr,  # the same memory as fp32 [rows, 2 * DESC_FIELDS]
    out_ptr,  # fp32 / fp16 / bf16
    desc_row_stride,  # 0 for a batch tensor (one shared row), DESC_FIELDS for a list
    stride_src_n,  # batch stride of the source tensor (0 for a list)
    stride_out_n,
    stride_out_c,  # negative for BGR output (then out_c0 = 2 * |stride_out_c|)
    stride_out_y,
    stride_out_x,
    out_c0,
    out_h,
    out_w,
    FORMAT: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    pid_x = tl.program_id(0)
    pid_y = tl.program_id(1)
    n = tl.program_id(2)
    d = desc_ptr + n * desc_row_stride
    df = descf_ptr + 2 * n * desc_row_stride  # f32 field k of this row: df[2 k]
    frame = tl.load(d + L.FRAME) + n.to(tl.int64) * stride_src_n
    H = tl.load(d + L.H).to(tl.int32)
    W = tl.load(d + L.W).to(tl.int32)
    nh = tl.load(d + L.NH).to(tl.int32)  # resized size
    nw = tl.load(d + L.NW).to(tl.int32)

    oy = pid_y * BLOCK_Y + tl.arange(0, BLOCK_Y)[:, None]
    ox = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)[None, :]
    in_tile = (oy < out_h) & (ox < out_w)
    ry = oy + tl.load(d + L.OFFY).to(tl.int32)
    rx = ox + tl.load(d + L.OFFX).to(tl.int32)
    inside = (ry >= 0) & (ry < nh) & (rx >= 0) & (rx < nw)
    # Clamped so every address is in bounds even where the mask is off; the pad region loads nothing.
    ry = tl.minimum(tl.maximum(ry, 0), nh - 1)
    rx = tl.minimum(tl.maximum(rx, 0), nw - 1)
    m = in_tile & inside

    # Source layout and colour coefficients, loaded once per program.
    sh = tl.load(d + L.STRIDE_H)
    sw = tl.load(d + L.STRIDE_W)
    if FORMAT == L.YUV420:
        lay = (sh, sw, tl.load(d + L.A), tl.load(d + L.B), tl.load(d + L.CPITCH), tl.load(d + L.CSTEP))
        yf = df + 2 * L.YUV
        yuv = (tl.load(yf), tl.load(yf + 2), tl.load(yf + 4), tl.load(yf + 6), tl.load(yf + 8), tl.load(yf + 10))
    else:  # packed RGB: no chroma planes, no colour matrix
        lay = (sh, sw, tl.load(d + L.A), tl.load(d + L.B), sh, sw)
        yuv = (0.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    scale_y = tl.load(df + 2 * L.SCALEY)
    scale_x = tl.load(df + 2 * L.SCALEX)

    if INTERP == L.COPY8:  # COPY8: 8 consecutive pixels per thread = 24 bytes = 3 aligned words, no shuffles
        r, g, b = _copy8_rgb24(src_ptr, frame, sh, lay[2], pid_x, pid_y, H, W, BLOCK_Y, BLOCK_X)
    elif (
        INTERP == L.COPY or INTERP == L.NEAREST
    ):  # copy (resized size == source size) or nearest (PyTorch's fp32 product, then floor)
        if INTERP == L.COPY:
            iy, ix = ry, rx
        else:
            iy = tl.minimum((ry.to(tl.float32) * scale_y).to(tl.int32), H - 1)
            ix = tl.minimum((rx.to(tl.float32) * scale_x).to(tl.int32), W - 1)
        if (
            FORMAT == L.RGB24 or FORMAT == L.BGR24
        ):  # RGB24: one pixel from one or two 32-bit words (2 loads, 1 mostly masked, not 3)
            row = frame + iy.to(tl.int64) * sh
            r, g, b, _, _, _ = _pair_rgb24(src_ptr, row, ix, m, m, False, FORMAT == L.BGR24)
        else:
            r, g, b = _sample(src_ptr, frame, iy, ix, m, lay, yuv, FORMAT)
    elif INTERP == L.BILINEAR:
        y0, y1, ly = _linear_taps(ry, scale_y, H)
        x0, x1, lx = _linear_taps(rx, scale_x, W)
        if (
            FORMAT == L.RGB24 or FORMAT == L.BGR24
        ):  # RGB24: x1 is x0 + 1 or x0 (right edge): one 3-word window per row holds both taps
            edge = x1 == x0
            rev = FORMAT == L.BGR24
            row0 = frame + y0.to(tl.int64) * sh
            row1 = frame + y1.to(tl.int64) * sh
            r00, g00, b00, r01, g01, b01 = _pair_rgb24(src_ptr, row0, x0, edge, m, True, rev)
            r10, g10, b10, r11, g11, b11 = _pair_rgb24(src_ptr, row1, x0, edge, m, True, rev)
        else:
            r00, g00, b00 = _sample(src_ptr, frame, y0, x0, m, lay, yuv, FORMAT)
            r01, g01, b01 = _sample(src_ptr, frame, y0, x1, m, lay, yuv, FORMAT)
            r10, g10, b10 = _sample(src_ptr, frame, y1, x0, m, lay, yuv, FORMAT)
            r11, g11, b11 = _sample(src_ptr, frame, y1, x1, m, lay, yuv, FORMAT)
        hy = 1.0 - ly
        hx = 1.0 - lx
        r = hy * (hx * r00 + lx * r01) + ly * (hx * r10 + lx * r11)
        g = hy * (hx * g00 + lx * g01) + ly * (hx * g10 + lx * g11)
        b = hy * (hx * b00 + lx * b01) + ly * (hx * b10 + lx * b11)
    else:  # antialiased bilinear: triangle-filter taps, horizontal sums first (as PyTorch), normalized last
        inv_y = tl.load(df + 2 * L.INVY)
        inv_x = tl.load(df + 2 * L.INVX)
        taps_y = tl.load(d + L.TAPSY).to(tl.int32)
        taps_x = tl.load(d + L.TAPSX).to(tl.int32)
        cy, ylo, yn = _aa_window(ry, scale_y, tl.load(df + 2 * L.SUPY), H, taps_y)
        cx, xlo, xn = _aa_window(rx, scale_x, tl.load(df + 2 * L.SUPX), W, taps_x)
        r = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.float32)
        g = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.float32)
        b = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.float32)
        ty = tl.zeros_like(cy)
        tx = tl.zeros_like(cx)
        for ky in range(0, taps_y):
            wy = tl.maximum(1.0 - tl.abs(((ylo + ky).to(tl.float32) - cy + 0.5) * inv_y), 0.0)
            wy = tl.where(ky < yn, wy, 0.0)
            ty += wy
            yy = tl.minimum(ylo + ky, H - 1)
            my = m & (wy > 0.0)  # zero-weight taps load nothing
            tx = tl.zeros_like(cx)  # the same every row; the last row's sum is kept
            hr = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.float32)
            hg = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.float32)
            hb = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.float32)
            for kx in range(0, taps_x):
                wx = tl.maximum(1.0 - tl.abs(((xlo + kx).to(tl.float32) - cx + 0.5) * inv_x), 0.0)
                wx = tl.where(kx < xn, wx, 0.0)
                tx += wx
                xx = tl.minimum(xlo + kx, W - 1)
                pr, pg, pb = _sample(src_ptr, frame, yy, xx, my & (wx > 0.0), lay, yuv, FORMAT)
                hr += wx * pr
                hg += wx * pg
                hb += wx * pb
            r += wy * hr
            g += wy * hg
            b += wy * hb
        # PyTorch normalizes the weights first; normalizing the sum instead differs by float rounding only.
        # div_rn: GPU `/` is approximate.
        total = ty * tx
        total = tl.where(total != 0.0, total, 1.0)
        r = tl.math.div_rn(r, total)
        g = tl.math.div_rn(g, total)
        b = tl.math.div_rn(b, total)

    # Normalize with host-rounded reciprocals; the letterbox border gets the normalized pad value.
    fs, fb, fp = df + 2 * L.NORM_SCALE, df + 2 * L.NORM_BIAS, df + 2 * L.NORM_PAD  # 3 f32 fields each
    r = tl.where(inside, r * tl.load(fs) + tl.load(fb), tl.load(fp))
    g = tl.where(inside, g * tl.load(fs + 2) + tl.load(fb + 2), tl.load(fp + 2))
    b = tl.where(inside, b * tl.load(fs + 4) + tl.load(fb + 4), tl.load(fp + 4))
    o = out_ptr + n.to(tl.int64) * stride_out_n + out_c0 + oy * stride_out_y + ox * stride_out_x
    _store(o, r, in_tile)
    _store(o + stride_out_c, g, in_tile)
    _store(o + 2 * stride_out_c, b, in_tile)


# --------------------------------------------------------------------------------------------- host side

INTERPRETED = type(_preprocess_kernel).__name__ == "InterpretedFunction"


def _bits(x: float) -> int:
    """The fp32 bit pattern of x in the low 32 bits of a descriptor field (read through the fp32 view)."""
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _f32_div(a: float, b: float) -> float:
    """a / b rounded once to fp32, as C++ computes `(float)a / b`."""
    return float(np.float32(a) / np.float32(b))


def descriptor_row(
    frame: int,
    hw: tuple[int, int],
    strides: tuple[int, ...],
    geometry,
    config: PreprocessConfig,
    consts: tuple[tuple[float, ...], ...],
    yuv: tuple[float, ...],
) -> list[int]:
    """One image's descriptor (fields of `_preprocess_layout`): source layout, resize geometry, constants.

    strides: (stride_h, stride_w, stride_c) of an RGB image, (stride_h, stride_w) of a YUV frame.
    """
    H, W = hw
    (nh, nw), (top, left) = geometry.resized_size, geometry.offset
    sh, sw = strides[0], strides[1]
    if config.is_yuv:
        if config.format == "nv12":  # interleaved UV rows after the luma rows
            a, b, cpitch, cstep = H * sh, H * sh + sw, sh, 2 * sw
        else:  # i420: U plane then V plane, half-pitch rows (stride_w == 1, checked)
            a, b, cpitch, cstep = H * sh, H * sh + (H // 2) * (sh // 2), sh // 2, 1
    else:
        sc = strides[2]
        a, b = (2 * sc, -sc) if config.format == "bgr" else (0, sc)
        cpitch = cstep = 0
    # PyTorch computes in/out in fp32 (area_pixel_compute_scale); so do we, once, here.
    scale_y, scale_x = _f32_div(H, nh), _f32_div(W, nw)
    sup_y, sup_x = max(scale_y, 1.0), max(scale_x, 1.0)
    scale, bias, pad = consts
    fields = (
        (L.FRAME, frame),
        (L.H, H),
        (L.W, W),
        (L.STRIDE_H, sh),
        (L.STRIDE_W, sw),
        (L.A, a),
        (L.B, b),
        (L.CPITCH, cpitch),
        (L.CSTEP, cstep),
        (L.NH, nh),
        (L.NW, nw),
        (L.OFFY, -top),
        (L.OFFX, -left),
        (L.SCALEY, _bits(scale_y)),
        (L.SCALEX, _bits(scale_x)),
        (L.SUPY, _bits(sup_y)),
        (L.SUPX, _bits(sup_x)),
        (L.INVY, _bits(_f32_div(1.0, sup_y))),
        (L.INVX, _bits(_f32_div(1.0, sup_x))),
        (L.TAPSY, 2 * math.ceil(sup_y) + 1),  # PyTorch's max_interp_size
        (L.TAPSX, 2 * math.ceil(sup_x) + 1),
    )
    row = [0] * DESC_FIELDS
    for field, value in fields:
        row[field] = value  # a tl.constexpr indexes a list like its int
    for first, values in ((L.NORM_SCALE, scale), (L.NORM_BIAS, bias), (L.NORM_PAD, pad), (L.YUV, yuv)):
        row[first : first + len(values)] = [_bits(v) for v in values]
    return row


# ------------------------------------------------------------------------------------------ launch decisions


def interp_code(config: PreprocessConfig, sizes, geometries) -> int:
    """The INTERP constexpr: COPY where every image keeps its size (exact for all three modes at scale 1)."""
    if all(g.resized_size == hw for g, hw in zip(geometries, sizes, strict=True)):
        return COPY
    if config.interpolation == "nearest":
        return NEAREST
    return ANTIALIAS if config.antialias else BILINEAR


def pixel_format(config: PreprocessConfig, strides: list[tuple[int, ...]], interp: int) -> int:
    """The FORMAT constexpr: RGB24 where pixels can be read as whole words (every image has 3-byte pixels with
    adjacent channels; `LaunchPlan.variant` still checks the source pointer's alignment per call). Antialias
    keeps byte loads: its taps are single pixels in a loop, where the word shuffling would not pay."""
    if config.is_yuv:
        return YUV420
    # torch has no negative strides: the channel stride is +1, and BGR input has R in the pixel's last byte.
    rgb24 = all(st[1] == 3 and st[2] == 1 for st in strides)
    if interp == ANTIALIAS or not rgb24:
        return PACKED_RGB
    return BGR24 if config.format == "bgr" else RGB24


def copy8_ok(items: list[torch.Tensor], geometries, per_image: bool) -> bool:
    """COPY8 (after COPY + RGB24 were picked): a batch tensor (a list's frame offsets change per call) whose
    rows and images start 8-byte aligned, copied at zero offset into an output of its own size."""
    if per_image or any(g.offset != (0, 0) or g.output_size != g.resized_size for g in geometries):
        return False
    t = items[0]
    return t.stride(-3) % 8 == 0 and (t.shape[0] == 1 or t.stride(0) % 8 == 0)


def to_device_table(rows: list[list[int]] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The descriptor rows as an int64 tensor on `device`, uploaded without blocking the host."""
    host = rows if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=torch.int64)
    if device.type == "cpu":
        return host
    # Pinned + non_blocking: a pageable copy would wait for all work queued on the stream.
    return host.pin_memory().to(device, non_blocking=True)


class LaunchPlan:
    """Everything a launch needs besides the tensors, built once per (config, size, input layout, device):
    the descriptor table, the kernel variant (FORMAT, INTERP), the output shape and strides' order."""

    __slots__ = (
        "bgr_out",
        "fmt",
        "interp",
        "n",
        "nhwc",
        "out_hw",
        "out_shape",
        "params",
        "per_image",
        "single",
        "table",
        "table_f32",
        "tables",
    )

    def __init__(self, cfg: PreprocessConfig, parsed: ParsedImages, size: tuple[int, int]) -> None:
        self.per_image = parsed.batch is None  # a list: one descriptor row per image
        if self.per_image and INTERPRETED and parsed.device.type != "cpu":
            # The interpreter copies each tensor argument to the host; the other images of a list, addressed
            # from the first one's pointer, would be read at their device addresses.
            raise RuntimeError("a list of GPU images cannot run in Triton's interpreter; unset TRITON_INTERPRET")
        items = parsed.items if self.per_image else [parsed.batch]
        sizes = parsed.sizes if self.per_image else parsed.sizes[:1]
        consts = normalization_constants(cfg)
        yuv = yuv_coefficients(cfg.yuv_matrix, cfg.yuv_range)
        geoms = [plan_geometry(hw, size, cfg.fit, cfg.crop_pct) for hw in sizes]
        rows = [
            descriptor_row(0, hw, t.stride()[-2:] if cfg.is_yuv else t.stride()[-3:], g, cfg, consts, yuv)
            for t, hw, g in zip(items, sizes, geoms, strict=True)
        ]
        # A batch's table lives on the device for good; a list's is a host template whose frame offsets
        # (the images' addresses) are filled in per call.
        self.table = torch.tensor(rows, dtype=torch.int64) if self.per_image else to_device_table(rows, parsed.device)
        self.table_f32 = self.table.view(torch.float32)  # the kernel reads the fp32 fields through this view
        # A list's device tables by the images' offsets from the first one: a pipeline cycling through the same
        # buffers uploads nothing after warm-up (each upload is a pinned allocation + copy, ~20-60 us of host).
        self.tables: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.interp = interp_code(cfg, sizes, geoms)
        self.fmt = pixel_format(cfg, [t.stride()[-3:] for t in items], self.interp)
        if self.interp == COPY and self.fmt in (RGB24, BGR24) and copy8_ok(items, geoms, self.per_image):
            self.interp = COPY8
        self.n, self.single, self.out_hw = parsed.n, parsed.single, size
        self.bgr_out, self.nhwc = cfg.output_order == "bgr", cfg.layout == "NHWC"
        shape = output_shape(parsed.n, size, cfg.layout)
        self.out_shape = shape[1:] if parsed.single else shape
        self.params = geoms if self.per_image else geoms * parsed.n

    def variant(self, src: torch.Tensor) -> tuple[int, int]:
        """(FORMAT, INTERP) for this call: the plan's, unless the source pointer is not aligned to the words the
        RGB24 reads use (4 bytes; 8 for COPY8), then byte loads."""
        if self.fmt >= RGB24 and src.data_ptr() % (8 if self.interp == COPY8 else 4):
            return PACKED_RGB, (COPY if self.interp == COPY8 else self.interp)
        return self.fmt, self.interp

    def _list_tables(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The device table of a list, its frame offsets being these images' addresses from the first one's."""
        base = images[0].data_ptr()
        offsets = tuple(t.data_ptr() - base for t in images)
        tables = self.tables.get(offsets)
        if tables is None:
            host = self.table.clone()
            host[:, L.FRAME.value] = torch.tensor(offsets, dtype=torch.int64)
            table = to_device_table(host, images[0].device)
            tables = (table, table.view(torch.float32))
            if len(self.tables) >= _LIST_TABLES_PER_PLAN:
                with contextlib.suppress(StopIteration, RuntimeError):  # another thread may evict too
                    self.tables.pop(next(iter(self.tables)), None)
            self.tables[offsets] = tables
        return tables

    def run(self, images, out: torch.Tensor) -> None:
        """Launch over `images` (the tensor or list this plan was built for) into `out` (checked by the caller)."""
        if self.per_image:  # one launch over the list: every image is addressed from the first one's pointer
            src, stride_src_n = images[0], 0
            table, table_f32 = self._list_tables(images)
        else:
            src, table, table_f32 = images, self.table, self.table_f32
            stride_src_n = 0 if self.single else images.stride(0)
        st = out.stride()
        if self.single:
            st = (0, *st)
        fmt, interp = self.variant(src)
        launch(
            src,
            table,
            table_f32,
            out,
            (st[0], st[3], st[1], st[2]) if self.nhwc else st,  # as (n, c, y, x)
            self.out_hw,
            n=self.n,
            per_image_rows=self.per_image,
            stride_src_n=stride_src_n,
            fmt=fmt,
            interp=interp,
            bgr_out=self.bgr_out,
        )


def launch(
    src: torch.Tensor,
    table: torch.Tensor,
    table_f32: torch.Tensor,
    out: torch.Tensor,
    out_strides: tuple[int, int, int, int],
    out_hw: tuple[int, int],
    *,
    n: int,
    per_image_rows: bool,
    stride_src_n: int,
    fmt: int,
    interp: int,
    bgr_out: bool,
) -> None:
    """Launch the kernel variant (fmt, interp) over `n` images into `out`, whose (n, c, y, x) strides are
    `out_strides`. table: the int64 descriptor rows; table_f32: ``table.view(torch.float32)``."""
    son, soc, soy, sox = out_strides
    c0 = 0
    if bgr_out:  # write R to channel 2 and B to channel 0: walk the channels backwards
        c0, soc = 2 * soc, -soc
    if INTERPRETED:
        by, bx, warps = INTERP_BLOCK_Y, INTERP_BLOCK_X, 4
    else:
        by, bx, warps = TILE_COPY8 if interp == COPY8 else TILE
    grid = (triton.cdiv(out_hw[1], bx), triton.cdiv(out_hw[0], by), n)
    ints = (DESC_FIELDS if per_image_rows else 0, stride_src_n, son, soc, soy, sox, c0, *out_hw)
    args = (src, table, table_f32, out, *ints)
    dev = src.get_device()  # -1 on CPU; an int without building a torch.device (hot path)
    if dev >= 0 and dev != torch.cuda.current_device():
        with torch.cuda.device(src.device):  # Triton launches on the current device
            _launch(grid, args, ints, fmt, interp, by, bx, warps, dev)
    else:
        _launch(grid, args, ints, fmt, interp, by, bx, warps, dev)


# Bound launchers of compiled kernels, by everything Triton specializes a compiled kernel on for these
# arguments: the constexprs, the output dtype, the exact int arguments (Triton specializes ints on == 1 and
# divisibility by 16; the exact values cover that) and whether each pointer is 16-byte aligned.
_launchers: dict[tuple, object] = {}
_LAUNCHERS_MAX = 256
FAST_LAUNCH = True  # False: every launch goes through JITFunction.run (the benchmark compares both)


def _launch(grid, args, ints, fmt: int, interp: int, by: int, bx: int, warps: int, dev: int) -> None:
    """Launch through the compiled kernel's own launcher once it exists.

    `JITFunction.run` re-binds the arguments, recomputes the specialization key and re-checks globals on every
    call (~10-15 us of host time per launch measured on the H100's host: the whole cost of a batch-1 call).
    The first launch of a specialization goes through it and returns the `CompiledKernel`; later launches
    call ``compiled[grid](*args)`` (Triton's public launcher of a compiled kernel: it reads the current
    stream and honours the launch hooks), which binds nothing.
    """
    src, table, _, out = args[:4]
    aligned = (src.data_ptr() % 16 == 0, out.data_ptr() % 16 == 0, table.data_ptr() % 16 == 0)
    key = (fmt, interp, by, bx, warps, dev, out.dtype, ints, grid, aligned)
    run = _launchers.get(key) if FAST_LAUNCH else None
    if run is not None:
        run(*args, fmt, interp, by, bx)
        return
    meta = {"FORMAT": fmt, "INTERP": interp, "BLOCK_Y": by, "BLOCK_X": bx, "num_warps": warps}
    compiled = _preprocess_kernel[grid](*args, **meta)
    if FAST_LAUNCH and not INTERPRETED and compiled is not None:
        if len(_launchers) >= _LAUNCHERS_MAX:
            _launchers.clear()
        _launchers[key] = compiled[grid]

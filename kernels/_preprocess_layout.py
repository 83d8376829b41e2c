"""What the preprocessing kernel and its host side agree on, declared once: the descriptor row's fields and the
FORMAT / INTERP constexpr codes.

The kernel reads these as attributes of this module (``L.FRAME``): Triton resolves a module attribute at compile
time and, unlike a module-level global of the kernel's own file, does not re-compare it on every
`JITFunction.run` (a ``tl.constexpr`` compare costs ~0.5-1.3 us of host time per global per launch).

Descriptor row: `FIELDS` int64 values per image. Fields marked f32 hold an fp32 bit pattern in their low 32 bits;
the kernel reads them through an fp32 view of the same memory (little-endian: fp32 element 2 k of int64 field k).
"""

import triton.language as tl

FRAME = tl.constexpr(0)  # byte offset of the image from src_ptr
H = tl.constexpr(1)  # source luma height, width
W = tl.constexpr(2)
STRIDE_H = tl.constexpr(3)  # byte strides of a row, a pixel
STRIDE_W = tl.constexpr(4)
A = tl.constexpr(5)  # RGB: offset of R in a pixel; YUV: U plane offset from the frame
B = tl.constexpr(6)  # RGB: channel stride (negative for BGR input); YUV: V plane offset
CPITCH = tl.constexpr(7)  # YUV: chroma row pitch, chroma sample step
CSTEP = tl.constexpr(8)
NH = tl.constexpr(9)  # resized size
NW = tl.constexpr(10)
OFFY = tl.constexpr(11)  # resized position = output position + offset (letterbox: negative)
OFFX = tl.constexpr(12)
SCALEY = tl.constexpr(13)  # f32 in/out per axis (PyTorch's scale)
SCALEX = tl.constexpr(14)
SUPY = tl.constexpr(15)  # f32 antialias support = max(scale, 1)
SUPX = tl.constexpr(16)
INVY = tl.constexpr(17)  # f32 1 / support
INVX = tl.constexpr(18)
TAPSY = tl.constexpr(19)  # antialias taps = 2 ceil(support) + 1
TAPSX = tl.constexpr(20)
NORM_SCALE = tl.constexpr(21)  # f32 x 3: 1 / (255 std) per output channel
NORM_BIAS = tl.constexpr(24)  # f32 x 3: -mean / std
NORM_PAD = tl.constexpr(27)  # f32 x 3: the normalized letterbox fill
YUV = tl.constexpr(30)  # f32 x 6: y_off, cy, crv, cgu, cgv, cbu of `yuv_coefficients`
FIELDS = tl.constexpr(36)

# FORMAT: how source pixels are read.
PACKED_RGB = tl.constexpr(0)  # any RGB/BGR layout, one byte load per channel
YUV420 = tl.constexpr(1)  # NV12 / I420 planes
RGB24 = tl.constexpr(2)  # 3-byte pixels, adjacent channels, 4-byte aligned base: aligned 32-bit word reads
BGR24 = tl.constexpr(3)  # RGB24 whose bytes are B, G, R (constant byte shifts)

# INTERP: how the resized image is sampled.
COPY = tl.constexpr(0)  # resized size == source size: normalize + layout only
NEAREST = tl.constexpr(1)
BILINEAR = tl.constexpr(2)
ANTIALIAS = tl.constexpr(3)
COPY8 = tl.constexpr(4)  # COPY of RGB24 rows starting 8-byte aligned: 8 pixels from 3 aligned 64-bit words

"""Triton kernels for the fused residual add + RMSNorm/LayerNorm, forward and backward.

One kernel family per direction, specialised by constexpr feature flags; everything that
varies per call (D, strides, eps, scales, row counts) is a runtime argument so a new shape
never triggers a recompile. Tiles are ``[BLOCK_M, BLOCK_D]``: several rows per program for
small D, one row (``BLOCK_M = 1``) for large D. When a row does not fit in one block
(``SINGLE_PASS = False``) the kernels loop over column chunks of ``BLOCK_D``.

Numerics: every load is widened to fp32, all arithmetic is fp32, and each output is rounded
once at its store. The forward normalises the fp32 ``h`` before rounding it to the residual
dtype. The backward differentiates the norm at the *stored* ``h``: it recomputes that row's
statistics from the values it reads (the forward's mean only serves as a shift, which keeps
the variance free of cancellation), so the Jacobian is exactly that of the tensor it sees.
Mixing the fp32 statistics with the rounded ``h`` would multiply the rounding error by rstd,
which is large for near-constant rows (e.g. LayerNorm with D = 1 gives garbage that way).
"""

import triton
import triton.language as tl


@triton.jit
def _branch_sum(
    X, R, BS, RS, rows, row_mask, cols, mask, D, stride_x, stride_r, residual_scale, branch_scale,
    HAS_RESIDUAL: tl.constexpr, HAS_BRANCH_SCALE: tl.constexpr, HAS_ROWSCALE: tl.constexpr,
):
    """h = residual_scale * r + branch_scale * bs[col] * rowscale[row] * x for one tile, fp32."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    f = x * branch_scale
    if HAS_BRANCH_SCALE:
        bs = tl.load(BS + cols, mask=cols < D, other=0.0).to(tl.float32)
        f = f * bs[None, :]
    if HAS_ROWSCALE:
        rs = tl.load(RS + rows, mask=row_mask, other=0.0).to(tl.float32)
        f = f * rs[:, None]
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        f = f + r.to(tl.float32) * residual_scale
    return f


@triton.jit
def _affine_weight(W, cols, D, ZERO_CENTERED: tl.constexpr):
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w = w + 1.0
    return w


@triton.jit
def _normalize_store(
    Y, W, B, h, mean, rstd, rows, cols, mask, D, stride_y,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
):
    if IS_RMS:
        y = h * rstd[:, None]
    else:
        y = (h - mean[:, None]) * rstd[:, None]
    if HAS_WEIGHT:
        y = y * _affine_weight(W, cols, D, ZERO_CENTERED)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def add_norm_fwd_kernel(
    X, R, W, B, BS, RS,          # inputs (unused pointers are dummies, never read)
    Y, H, MEAN,                  # outputs; MEAN (LayerNorm only) is the backward's shift
    n_rows, D, stride_x, stride_r, stride_y, stride_h,
    eps, residual_scale, branch_scale,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BRANCH_SCALE: tl.constexpr, HAS_ROWSCALE: tl.constexpr,
    ZERO_CENTERED: tl.constexpr, STORE_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    # torch.compile hands Python floats over as fp64; the math is fp32 by contract
    eps = tl.cast(eps, tl.float32)
    residual_scale = tl.cast(residual_scale, tl.float32)
    branch_scale = tl.cast(branch_scale, tl.float32)

    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_D)

    if SINGLE_PASS:
        mask = row_mask[:, None] & (cols < D)[None, :]
        h = _branch_sum(X, R, BS, RS, rows, row_mask, cols, mask, D, stride_x, stride_r,
                        residual_scale, branch_scale, HAS_RESIDUAL, HAS_BRANCH_SCALE, HAS_ROWSCALE)
        if STORE_H:
            tl.store(H + rows[:, None] * stride_h + cols[None, :], h.to(H.dtype.element_ty), mask=mask)
        if IS_RMS:
            mean = tl.zeros([BLOCK_M], tl.float32)
            var = tl.sum(h * h, 1) / D
        else:
            mean = tl.sum(h, 1) / D
            centred = tl.where(mask, h - mean[:, None], 0.0)
            var = tl.sum(centred * centred, 1) / D
        rstd = tl.rsqrt(var + eps)
        _normalize_store(Y, W, B, h, mean, rstd, rows, cols, mask, D, stride_y,
                         IS_RMS, HAS_WEIGHT, HAS_BIAS, ZERO_CENTERED)
    else:
        # Row too long for registers: pass 1 streams the row once for the statistics (and h),
        # pass 2 recomputes h from x and r (an L2 hit for a row in flight) rather than reading
        # back the rounded h, so y matches the single-pass kernel bit for bit.
        count = tl.zeros([BLOCK_M], tl.float32)
        mean = tl.zeros([BLOCK_M], tl.float32)
        m2 = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, D, BLOCK_D):
            c = start + cols
            mask = row_mask[:, None] & (c < D)[None, :]
            h = _branch_sum(X, R, BS, RS, rows, row_mask, c, mask, D, stride_x, stride_r,
                            residual_scale, branch_scale, HAS_RESIDUAL, HAS_BRANCH_SCALE, HAS_ROWSCALE)
            if STORE_H:
                tl.store(H + rows[:, None] * stride_h + c[None, :], h.to(H.dtype.element_ty), mask=mask)
            if IS_RMS:
                m2 += tl.sum(h * h, 1)
            else:
                # Chan et al.'s pairwise merge of (count, mean, M2): no sum-of-squares cancellation
                n_chunk = tl.minimum(D - start, BLOCK_D).to(tl.float32)
                chunk_mean = tl.sum(h, 1) / n_chunk
                d = tl.where(mask, h - chunk_mean[:, None], 0.0)
                new_count = count + n_chunk
                delta = chunk_mean - mean
                mean += delta * (n_chunk / new_count)
                m2 += tl.sum(d * d, 1) + delta * delta * (count * n_chunk / new_count)
                count = new_count
        rstd = tl.rsqrt(m2 / D + eps)
        for start in range(0, D, BLOCK_D):
            c = start + cols
            mask = row_mask[:, None] & (c < D)[None, :]
            h = _branch_sum(X, R, BS, RS, rows, row_mask, c, mask, D, stride_x, stride_r,
                            residual_scale, branch_scale, HAS_RESIDUAL, HAS_BRANCH_SCALE, HAS_ROWSCALE)
            _normalize_store(Y, W, B, h, mean, rstd, rows, c, mask, D, stride_y,
                             IS_RMS, HAS_WEIGHT, HAS_BIAS, ZERO_CENTERED)

    if not IS_RMS:
        tl.store(MEAN + rows, mean, mask=row_mask)


@triton.jit
def _grad_tile(
    DY, H, W, shift, rows, cols, mask, D, stride_dy, stride_h,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, ZERO_CENTERED: tl.constexpr,
):
    """(dy, d = h - shift, g = dy * w') for one tile, zero outside the mask."""
    d = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if not IS_RMS:
        d = tl.where(mask, d - shift[:, None], 0.0)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        g = dy * _affine_weight(W, cols, D, ZERO_CENTERED)[None, :]
    else:
        g = dy
    return dy, d, g


@triton.jit
def _grad_coefficients(s_d, s_dd, s_gd, s_g, D, eps, IS_RMS: tl.constexpr):
    """Per-row (mean_d, rstd, c1, c2) from the row sums of d, d*d, g*d and g, where
    d = h - shift: mean = shift + mean_d, xhat = (d - mean_d) * rstd,
    c1 = mean(g * xhat) and c2 = mean(g), so that dh = rstd * (g - c1 * xhat - c2)."""
    if IS_RMS:
        rstd = tl.rsqrt(s_dd / D + eps)
        zero = tl.zeros_like(rstd)
        return zero, rstd, rstd * s_gd / D, zero
    mean_d = s_d / D
    rstd = tl.rsqrt(tl.maximum(s_dd / D - mean_d * mean_d, 0.0) + eps)
    return mean_d, rstd, rstd * (s_gd / D - mean_d * s_g / D), s_g / D


@triton.jit
def _input_grad(d, g, mean_d, rstd, c1, c2, mask, IS_RMS: tl.constexpr):
    """(xhat, dh) of the norm for one tile."""
    if IS_RMS:
        xhat = d * rstd[:, None]
        return xhat, (g - xhat * c1[:, None]) * rstd[:, None]
    xhat = tl.where(mask, (d - mean_d[:, None]) * rstd[:, None], 0.0)
    return xhat, tl.where(mask, (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _store_input_grads(
    DH, X, BS, RS, DX, DR, dh, rows, row_mask, cols, mask, D,
    stride_dh, stride_x, stride_dx, stride_dr, residual_scale, branch_scale,
    HAS_DH: tl.constexpr, HAS_BRANCH_SCALE: tl.constexpr, HAS_ROWSCALE: tl.constexpr,
    STORE_DR: tl.constexpr,
):
    """Add h's own upstream gradient, store dx and dresidual; returns dbranch_scale's tile."""
    if HAS_DH:
        # loaded last: it is only needed now, so it does not occupy registers during the reductions
        dh += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if STORE_DR:
        tl.store(DR + rows[:, None] * stride_dr + cols[None, :],
                 (dh * residual_scale).to(DR.dtype.element_ty), mask=mask)
    dx = dh * branch_scale
    if HAS_ROWSCALE:
        rs = tl.load(RS + rows, mask=row_mask, other=0.0).to(tl.float32)
        dx = dx * rs[:, None]
    dbs = dx  # d h / d bs = branch_scale * rowscale * x; only used when HAS_BRANCH_SCALE
    if HAS_BRANCH_SCALE:
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dbs = dx * x
        dx = dx * tl.load(BS + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    return dbs


@triton.jit
def add_norm_bwd_kernel(
    DY, DH, H, X, W, BS, RS, MEAN,           # inputs
    DX, DR, DW_PART, DB_PART, DBS_PART,      # outputs; *_PART are (programs, D) fp32 partial sums
    n_rows, D, rows_per_program,
    stride_dy, stride_dh, stride_h, stride_x, stride_dx, stride_dr,
    eps, residual_scale, branch_scale,
    IS_RMS: tl.constexpr, HAS_DH: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_BRANCH_SCALE: tl.constexpr, HAS_ROWSCALE: tl.constexpr, ZERO_CENTERED: tl.constexpr,
    STORE_DR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    """Two shapes of the same computation, picked by the launcher from D:

    - SINGLE_PASS: the tile of BLOCK_M rows is read once and stays in registers.
    - otherwise the rows are longer than registers can hold together with the parameter-
      gradient accumulators (spills from about D = 16K in bf16): pass 1 streams column chunks
      of BLOCK_M rows and accumulates the four row sums; pass 2 re-reads the chunks (L2 hits:
      the rows were just read) for dx, and adds the chunk's parameter gradients, summed over
      the BLOCK_M rows, into this program's row of the partial buffers (read-modify-write;
      only this program touches that row, and summing BLOCK_M rows first divides that
      traffic by BLOCK_M).
    """
    # Persistent grid: program p owns rows [p * rows_per_program, ...) and one row of each
    # partial-sum buffer, which it always writes (even with no rows), so the buffers can come
    # from torch.empty and the second-step reduction is deterministic (no atomics anywhere).
    eps = tl.cast(eps, tl.float32)
    residual_scale = tl.cast(residual_scale, tl.float32)
    branch_scale = tl.cast(branch_scale, tl.float32)
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_D)
    part = pid.to(tl.int64) * D

    if SINGLE_PASS:
        col_mask = cols < D
        acc_dw = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc_db = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc_dbs = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for m in range(row_start, row_end, BLOCK_M):
            rows = m + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            shift = tl.zeros([BLOCK_M], tl.float32)
            if not IS_RMS:
                shift = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            dy, d, g = _grad_tile(DY, H, W, shift, rows, cols, mask, D, stride_dy, stride_h,
                                  IS_RMS, HAS_WEIGHT, ZERO_CENTERED)
            mean_d, rstd, c1, c2 = _grad_coefficients(
                tl.sum(d, 1), tl.sum(d * d, 1), tl.sum(g * d, 1), tl.sum(g, 1), D, eps, IS_RMS)
            xhat, dh = _input_grad(d, g, mean_d, rstd, c1, c2, mask, IS_RMS)
            if HAS_WEIGHT:
                acc_dw += dy * xhat
            if HAS_BIAS:
                acc_db += dy
            dbs = _store_input_grads(DH, X, BS, RS, DX, DR, dh, rows, row_mask, cols, mask, D,
                                     stride_dh, stride_x, stride_dx, stride_dr, residual_scale,
                                     branch_scale, HAS_DH, HAS_BRANCH_SCALE, HAS_ROWSCALE, STORE_DR)
            if HAS_BRANCH_SCALE:
                acc_dbs += dbs
        if HAS_WEIGHT:
            tl.store(DW_PART + part + cols, tl.sum(acc_dw, 0), mask=col_mask)
        if HAS_BIAS:
            tl.store(DB_PART + part + cols, tl.sum(acc_db, 0), mask=col_mask)
        if HAS_BRANCH_SCALE:
            tl.store(DBS_PART + part + cols, tl.sum(acc_dbs, 0), mask=col_mask)
    else:
        zero = tl.zeros([BLOCK_D], tl.float32)
        for start in range(0, D, BLOCK_D):
            c = start + cols
            if HAS_WEIGHT:
                tl.store(DW_PART + part + c, zero, mask=c < D)
            if HAS_BIAS:
                tl.store(DB_PART + part + c, zero, mask=c < D)
            if HAS_BRANCH_SCALE:
                tl.store(DBS_PART + part + c, zero, mask=c < D)
        for m in range(row_start, row_end, BLOCK_M):
            rows = m + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            shift = tl.zeros([BLOCK_M], tl.float32)
            if not IS_RMS:
                shift = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            s_d = tl.zeros([BLOCK_M], tl.float32)
            s_dd = tl.zeros([BLOCK_M], tl.float32)
            s_gd = tl.zeros([BLOCK_M], tl.float32)
            s_g = tl.zeros([BLOCK_M], tl.float32)
            for start in range(0, D, BLOCK_D):
                c = start + cols
                mask = row_mask[:, None] & (c < D)[None, :]
                dy, d, g = _grad_tile(DY, H, W, shift, rows, c, mask, D, stride_dy, stride_h,
                                      IS_RMS, HAS_WEIGHT, ZERO_CENTERED)
                s_d += tl.sum(d, 1)
                s_dd += tl.sum(d * d, 1)
                s_gd += tl.sum(g * d, 1)
                s_g += tl.sum(g, 1)
            mean_d, rstd, c1, c2 = _grad_coefficients(s_d, s_dd, s_gd, s_g, D, eps, IS_RMS)
            for start in range(0, D, BLOCK_D):
                c = start + cols
                mask = row_mask[:, None] & (c < D)[None, :]
                dy, d, g = _grad_tile(DY, H, W, shift, rows, c, mask, D, stride_dy, stride_h,
                                      IS_RMS, HAS_WEIGHT, ZERO_CENTERED)
                xhat, dh = _input_grad(d, g, mean_d, rstd, c1, c2, mask, IS_RMS)
                dbs = _store_input_grads(DH, X, BS, RS, DX, DR, dh, rows, row_mask, c, mask, D,
                                         stride_dh, stride_x, stride_dx, stride_dr,
                                         residual_scale, branch_scale, HAS_DH, HAS_BRANCH_SCALE,
                                         HAS_ROWSCALE, STORE_DR)
                if HAS_WEIGHT:
                    acc = tl.load(DW_PART + part + c, mask=c < D, other=0.0)
                    tl.store(DW_PART + part + c, acc + tl.sum(dy * xhat, 0), mask=c < D)
                if HAS_BIAS:
                    acc = tl.load(DB_PART + part + c, mask=c < D, other=0.0)
                    tl.store(DB_PART + part + c, acc + tl.sum(dy, 0), mask=c < D)
                if HAS_BRANCH_SCALE:
                    acc = tl.load(DBS_PART + part + c, mask=c < D, other=0.0)
                    tl.store(DBS_PART + part + c, acc + tl.sum(dbs, 0), mask=c < D)

"""The tensor-core attention kernels' fragment math, executed on an emulated warp.

No GPU has run csrc/attention/attention_cuda.cu yet. This test transcribes the index formulas of its
tensor-core kernels (every ldmatrix row address, the accumulator-to-operand repacking of P and dS,
the masks, the online softmax, the dQ split across warps) and runs them on a numpy model of the two
PTX instructions they rest on - ldmatrix.m8n8.x4 (with and without .trans) and mma.m16n8k16 - as the
PTX ISA defines their per-lane fragments. It checks the layouts against float64 attention; it cannot
check the CUDA code itself (a transcription slip on either side is possible), rounding, or timing.
Keep it in step with the kernel when either changes.
"""

# ruff: noqa: E741  (l is the lane index, as in the PTX ISA's fragment tables)
import numpy as np
import pytest


def ldmatrix(smem, addr, trans):
    # addr[l] = (row, col) of the 8-element row given by lane l; returns r[l][m] = (e0, e1)
    r = [[None] * 4 for _ in range(32)]
    for l in range(32):
        for m in range(4):
            if not trans:
                row, col = addr[8 * m + l // 4]
                e = smem[row, col + 2 * (l % 4) : col + 2 * (l % 4) + 2]
                r[l][m] = (e[0], e[1])
            else:
                ra = addr[8 * m + 2 * (l % 4)]
                rb = addr[8 * m + 2 * (l % 4) + 1]
                r[l][m] = (smem[ra[0], ra[1] + l // 4], smem[rb[0], rb[1] + l // 4])
    return r


def mma(c, a, b0, b1):
    # c[l] = 4 floats, a[l] = 4 pairs, b0[l], b1[l] = pairs
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    C = np.zeros((16, 8))
    for l in range(32):
        g, t = l // 4, l % 4
        A[g, 2 * t : 2 * t + 2] = a[l][0]
        A[g + 8, 2 * t : 2 * t + 2] = a[l][1]
        A[g, 2 * t + 8 : 2 * t + 10] = a[l][2]
        A[g + 8, 2 * t + 8 : 2 * t + 10] = a[l][3]
        B[2 * t : 2 * t + 2, g] = b0[l]
        B[2 * t + 8 : 2 * t + 10, g] = b1[l]
        C[g, 2 * t : 2 * t + 2] = c[l][0:2]
        C[g + 8, 2 * t : 2 * t + 2] = c[l][2:4]
    D = A @ B + C
    for l in range(32):
        g, t = l // 4, l % 4
        c[l][0:2] = D[g, 2 * t : 2 * t + 2]
        c[l][2:4] = D[g + 8, 2 * t : 2 * t + 2]


def zeros_acc(n):
    return [[np.zeros(4) for _ in range(n)] for _ in range(32)]  # [lane][tile]


def pack(x, y):
    return (x, y)


def forward(q, k, v, klen, causal, scale, D):
    Lq = q.shape[0]
    M, N = 64, 64
    out = np.zeros((Lq, D))
    lse = np.zeros(Lq)
    for m0 in range(0, Lq, M):
        sQ = np.zeros((M, D))
        n = min(M, Lq - m0)
        sQ[:n] = q[m0 : m0 + n]
        key_end = min(m0 + M, klen) if causal else klen
        nblk = (key_end + N - 1) // N
        for warp in range(4):
            qa = []
            for kc in range(D // 16):
                addr = [(warp * 16 + (l % 16), kc * 16 + (l // 16) * 8) for l in range(32)]
                qa.append(ldmatrix(sQ, addr, False))
            o = zeros_acc(D // 8)
            m_run = np.full((32, 2), -np.inf)
            l_run = np.zeros((32, 2))
            for nb in range(nblk):
                n0 = nb * N
                sK = np.zeros((N, D))
                sV = np.zeros((N, D))
                nn = max(0, min(N, klen - n0))
                sK[:nn] = k[n0 : n0 + nn]
                sV[:nn] = v[n0 : n0 + nn]
                sc = zeros_acc(N // 8)
                for kc in range(D // 16):
                    for nt in range(0, N // 8, 2):
                        addr = [
                            (nt * 8 + (l // 16) * 8 + (l % 8), kc * 16 + ((l // 8) % 2) * 8)
                            for l in range(32)
                        ]
                        kb = ldmatrix(sK, addr, False)
                        a = [qa[kc][l] for l in range(32)]
                        c0 = [sc[l][nt] for l in range(32)]
                        c1 = [sc[l][nt + 1] for l in range(32)]
                        mma(c0, a, [kb[l][0] for l in range(32)], [kb[l][1] for l in range(32)])
                        mma(c1, a, [kb[l][2] for l in range(32)], [kb[l][3] for l in range(32)])
                sl2 = scale * np.log2(np.e)
                for l in range(32):
                    g, t = l // 4, l % 4
                    row0 = m0 + warp * 16 + g
                    row1 = row0 + 8
                    for nt in range(N // 8):
                        sc[l][nt] *= sl2
                        for e in range(4):
                            j = n0 + nt * 8 + 2 * t + (e & 1)
                            i = row0 if e < 2 else row1
                            if j >= klen or (causal and j > i):
                                sc[l][nt][e] = -np.inf
                for r in range(2):
                    # quad reductions
                    mx = np.array(
                        [
                            max(max(sc[l][nt][2 * r], sc[l][nt][2 * r + 1]) for nt in range(N // 8))
                            for l in range(32)
                        ]
                    )
                    mxq = np.array([max(mx[(l // 4) * 4 + u] for u in range(4)) for l in range(32)])
                    for l in range(32):
                        m_new = max(m_run[l][r], mxq[l])
                        base = 0.0 if m_new == -np.inf else m_new
                        alpha = np.exp2(m_run[l][r] - base)
                        m_run[l][r] = m_new
                        s = 0.0
                        for nt in range(N // 8):
                            for e in (2 * r, 2 * r + 1):
                                pe = np.exp2(sc[l][nt][e] - base)
                                s += pe
                                sc[l][nt][e] = pe
                        l_run[l][r] = l_run[l][r] * alpha + s
                        for dt in range(D // 8):
                            o[l][dt][2 * r] *= alpha
                            o[l][dt][2 * r + 1] *= alpha
                for kc in range(N // 16):
                    pa = [
                        (
                            pack(sc[l][2 * kc][0], sc[l][2 * kc][1]),
                            pack(sc[l][2 * kc][2], sc[l][2 * kc][3]),
                            pack(sc[l][2 * kc + 1][0], sc[l][2 * kc + 1][1]),
                            pack(sc[l][2 * kc + 1][2], sc[l][2 * kc + 1][3]),
                        )
                        for l in range(32)
                    ]
                    for dt in range(0, D // 8, 2):
                        addr = [
                            (kc * 16 + ((l // 8) % 2) * 8 + (l % 8), dt * 8 + (l // 16) * 8)
                            for l in range(32)
                        ]
                        vb = ldmatrix(sV, addr, True)
                        c0 = [o[l][dt] for l in range(32)]
                        c1 = [o[l][dt + 1] for l in range(32)]
                        mma(c0, pa, [vb[l][0] for l in range(32)], [vb[l][1] for l in range(32)])
                        mma(c1, pa, [vb[l][2] for l in range(32)], [vb[l][3] for l in range(32)])
            for r in range(2):
                for l in range(32):
                    g, t = l // 4, l % 4
                    lq = sum(l_run[(l // 4) * 4 + u][r] for u in range(4))
                    i = m0 + warp * 16 + g + 8 * r
                    if i >= Lq:
                        continue
                    inv = 1 / lq if lq > 0 else 0
                    for dt in range(D // 8):
                        out[i, dt * 8 + 2 * t : dt * 8 + 2 * t + 2] = o[l][dt][2 * r : 2 * r + 2] * inv
                    if t == 0:
                        lse[i] = m_run[l][r] * np.log(2) + np.log(lq) if lq > 0 else -np.inf
    return out, lse


def backward(q, k, v, go, lse, delta, klen, causal, scale, D, M):
    Lq, Lk = q.shape[0], k.shape[0]
    N = 64
    dq = np.zeros((Lq, D))
    dk = np.zeros((Lk, D))
    dv = np.zeros((Lk, D))
    kQT = M // 16
    kCG = 4 // kQT
    kQC = D // kCG
    sl2 = scale * np.log2(np.e)
    for n0 in range(0, Lk, N):
        sK = np.zeros((N, D))
        sV = np.zeros((N, D))
        nn = max(0, min(N, klen - n0))
        sK[:nn] = k[n0 : n0 + nn]
        sV[:nn] = v[n0 : n0 + nn]
        dka = {w: zeros_acc(D // 8) for w in range(4)}
        dva = {w: zeros_acc(D // 8) for w in range(4)}
        m_begin = (n0 // M) * M if causal else 0
        if n0 < klen:
            for m0 in range(m_begin, Lq, M):
                sQ = np.zeros((M, D))
                sO = np.zeros((M, D))
                n = min(M, Lq - m0)
                sQ[:n] = q[m0 : m0 + n]
                sO[:n] = go[m0 : m0 + n]
                sLse = np.full(M, np.inf)
                sDel = np.zeros(M)
                for r in range(n):
                    sLse[r] = np.inf if lse[m0 + r] == -np.inf else lse[m0 + r] * np.log2(np.e)
                    sDel[r] = delta[m0 + r]
                sdS = np.zeros((N, M))
                for warp in range(4):
                    st = zeros_acc(M // 8)
                    dpt = zeros_acc(M // 8)
                    for kc in range(D // 16):
                        addrA = [(warp * 16 + (l % 16), kc * 16 + (l // 16) * 8) for l in range(32)]
                        ka = ldmatrix(sK, addrA, False)
                        va = ldmatrix(sV, addrA, False)
                        for mt in range(0, M // 8, 2):
                            addr = [
                                (mt * 8 + (l // 16) * 8 + (l % 8), kc * 16 + ((l // 8) % 2) * 8)
                                for l in range(32)
                            ]
                            qb = ldmatrix(sQ, addr, False)
                            ob = ldmatrix(sO, addr, False)
                            for acc, a, bb in ((st, ka, qb), (dpt, va, ob)):
                                c0 = [acc[l][mt] for l in range(32)]
                                c1 = [acc[l][mt + 1] for l in range(32)]
                                mma(c0, a, [bb[l][0] for l in range(32)], [bb[l][1] for l in range(32)])
                                mma(c1, a, [bb[l][2] for l in range(32)], [bb[l][3] for l in range(32)])
                    for l in range(32):
                        g, t = l // 4, l % 4
                        key0 = n0 + warp * 16 + g
                        for mt in range(M // 8):
                            for e in range(4):
                                c = mt * 8 + 2 * t + (e & 1)
                                i = m0 + c
                                j = key0 if e < 2 else key0 + 8
                                pe = np.exp2(st[l][mt][e] * sl2 - sLse[c])
                                if j >= klen or (causal and j > i):
                                    pe = 0.0
                                dpt[l][mt][e] = pe * (dpt[l][mt][e] - sDel[c])
                                st[l][mt][e] = pe
                        for mt in range(M // 8):
                            sdS[warp * 16 + g, mt * 8 + 2 * t : mt * 8 + 2 * t + 2] = dpt[l][mt][0:2]
                            sdS[warp * 16 + g + 8, mt * 8 + 2 * t : mt * 8 + 2 * t + 2] = dpt[l][mt][2:4]
                    for kc in range(M // 16):
                        pa = [
                            (
                                (st[l][2 * kc][0], st[l][2 * kc][1]),
                                (st[l][2 * kc][2], st[l][2 * kc][3]),
                                (st[l][2 * kc + 1][0], st[l][2 * kc + 1][1]),
                                (st[l][2 * kc + 1][2], st[l][2 * kc + 1][3]),
                            )
                            for l in range(32)
                        ]
                        sa = [
                            (
                                (dpt[l][2 * kc][0], dpt[l][2 * kc][1]),
                                (dpt[l][2 * kc][2], dpt[l][2 * kc][3]),
                                (dpt[l][2 * kc + 1][0], dpt[l][2 * kc + 1][1]),
                                (dpt[l][2 * kc + 1][2], dpt[l][2 * kc + 1][3]),
                            )
                            for l in range(32)
                        ]
                        for dt in range(0, D // 8, 2):
                            addr = [
                                (kc * 16 + ((l // 8) % 2) * 8 + (l % 8), dt * 8 + (l // 16) * 8)
                                for l in range(32)
                            ]
                            ob = ldmatrix(sO, addr, True)
                            qb = ldmatrix(sQ, addr, True)
                            for acc, a, bb in ((dva[warp], pa, ob), (dka[warp], sa, qb)):
                                c0 = [acc[l][dt] for l in range(32)]
                                c1 = [acc[l][dt + 1] for l in range(32)]
                                mma(c0, a, [bb[l][0] for l in range(32)], [bb[l][1] for l in range(32)])
                                mma(c1, a, [bb[l][2] for l in range(32)], [bb[l][3] for l in range(32)])
                for warp in range(4):
                    qt, cg = warp % kQT, warp // kQT
                    dqa = zeros_acc(kQC // 8)
                    for kc in range(N // 16):
                        addr = [
                            (kc * 16 + (l // 16) * 8 + (l % 8), qt * 16 + ((l // 8) % 2) * 8)
                            for l in range(32)
                        ]
                        sa = ldmatrix(sdS, addr, True)
                        for ct in range(0, kQC // 8, 2):
                            addr2 = [
                                (kc * 16 + ((l // 8) % 2) * 8 + (l % 8), cg * kQC + ct * 8 + (l // 16) * 8)
                                for l in range(32)
                            ]
                            kb = ldmatrix(sK, addr2, True)
                            c0 = [dqa[l][ct] for l in range(32)]
                            c1 = [dqa[l][ct + 1] for l in range(32)]
                            mma(c0, sa, [kb[l][0] for l in range(32)], [kb[l][1] for l in range(32)])
                            mma(c1, sa, [kb[l][2] for l in range(32)], [kb[l][3] for l in range(32)])
                    for l in range(32):
                        g, t = l // 4, l % 4
                        for r in range(2):
                            i = m0 + qt * 16 + g + 8 * r
                            if i >= Lq:
                                continue
                            for ct in range(kQC // 8):
                                dq[i, cg * kQC + ct * 8 + 2 * t : cg * kQC + ct * 8 + 2 * t + 2] += dqa[l][
                                    ct
                                ][2 * r : 2 * r + 2]
        for warp in range(4):
            for l in range(32):
                g, t = l // 4, l % 4
                for r in range(2):
                    j = n0 + warp * 16 + g + 8 * r
                    if j >= Lk:
                        continue
                    for dt in range(D // 8):
                        dk[j, dt * 8 + 2 * t : dt * 8 + 2 * t + 2] = (
                            dka[warp][l][dt][2 * r : 2 * r + 2] * scale
                        )
                        dv[j, dt * 8 + 2 * t : dt * 8 + 2 * t + 2] = dva[warp][l][dt][2 * r : 2 * r + 2]
    return dq * scale, dk, dv


def reference(q, k, v, go, klen, causal, scale):
    Lq, Lk = q.shape[0], k.shape[0]
    s = q @ k.T * scale
    mask = np.arange(Lk)[None, :] < klen
    if causal:
        mask = mask & (np.arange(Lk)[None, :] <= np.arange(Lq)[:, None])
    s = np.where(mask, s, -np.inf)
    mx = s.max(1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0)
    p = np.exp(s - mx)
    lsum = p.sum(1, keepdims=True)
    P = np.where(lsum > 0, p / np.where(lsum > 0, lsum, 1), 0)
    lse = np.where(lsum[:, 0] > 0, mx[:, 0] + np.log(np.where(lsum[:, 0] > 0, lsum[:, 0], 1)), -np.inf)
    out = P @ v
    dv = P.T @ go
    dp = go @ v.T
    delta = (go * out).sum(1, keepdims=True)
    ds = P * (dp - delta)
    return out, lse, ds @ k * scale, ds.T @ q * scale, dv, delta[:, 0]


@pytest.mark.parametrize(
    "Lq, Lk, D, klen, causal, M",
    [
        (70, 90, 32, 90, True, 64),
        (37, 130, 64, 100, False, 64),
        (33, 70, 128, 50, True, 32),
        (20, 10, 32, 10, False, 64),
    ],
)
def test_fragment_layouts_match_float64(Lq, Lk, D, klen, causal, M):
    """Forward (out, logsumexp) and backward (dq, dk, dv) of the emulated kernels equal exact
    attention: partial query and key blocks, key lengths, causal, each head dim's backward row count."""
    rng = np.random.default_rng(Lq + Lk + D)
    q, k, v, go = (rng.standard_normal((n, D)) for n in (Lq, Lk, Lk, Lq))
    scale = 1 / np.sqrt(D)
    out, lse = forward(q, k, v, klen, causal, scale, D)
    ro, rl, rdq, rdk, rdv, delta = reference(q, k, v, go, klen, causal, scale)
    dq, dk, dv = backward(q, k, v, go, rl, delta, klen, causal, scale, D, M)
    for got, want in ((out, ro), (lse, rl), (dq, rdq), (dk, rdk), (dv, rdv)):
        np.testing.assert_allclose(got, want, atol=1e-12, rtol=1e-12)

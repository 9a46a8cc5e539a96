/* One time step of each recurrent cell, fused: its forward (the gate arithmetic after the
 * matmul H_{t-1} W_hh) and its backward (the derivative of that arithmetic), as one pass over
 * the (rows, n) elements each instead of ~10 (forward) and ~20 (backward) torch kernels.
 * The equations are those of cells.py, which is the reference and what runs without a C
 * compiler; kernels.py compiles this file and calls it. Everything is float32, C-contiguous,
 * `rows` x `n` (hidden size), gate blocks side by side in torch's order.
 *
 * Forward: xg = X_t W_x* + b_i* and hg = H_{t-1} W_h* + b_h* (rows, gates * n) -> h_out,
 * c_out (LSTM), and `saved`, what the backward needs.
 * Backward: the gradient reaching H_t is dmm (the previous backward step's product with
 * W_hh) + d_direct (GRU: through Z * H_{t-1}) + d_hs (from the layer's output);
 * it writes dxg (rows, gates * n), dhg where it differs from dxg (GRU), and the gradients
 * passed on to step t-1 that bypass W_hh: d_direct_out (GRU), d_c_out (LSTM).
 * Rows are looped one by one and kernels.py forbids peeling loops for alignment, so whether an
 * element is computed by vector or scalar code depends only on its column: a row's result is
 * bit for bit the same at every batch size.
 *
 * The loss and the one-hot input gates split their loops over torch's own OpenMP threads where
 * kernels.py could link against torch's OpenMP runtime (else the pragmas are ignored); each
 * element is computed by one thread in a fixed order, so the results never depend on the
 * thread count. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

static inline void rnn_row(long n, const float *restrict x, const float *restrict g, float *restrict h) {
    for (long j = 0; j < n; j++)
        h[j] = tanhf(x[j] + g[j]);
}

void rnn_forward(long rows, long n, const float *restrict xg, const float *restrict hg,
                 float *restrict h_out) {
    for (long b = 0; b < rows; b++)
        rnn_row(n, xg + b * n, hg + b * n, h_out + b * n);
}

/* saved: the step's own output H_t */
void rnn_backward(long rows, long n, const float *restrict dmm, const float *restrict d_hs,
                  const float *restrict h, float *restrict dxg) {
    for (long b = 0; b < rows; b++)
        for (long i = b * n; i < (b + 1) * n; i++) {
            float dh = dmm[i] + d_hs[i];
            dxg[i] = dh * (1.0f - h[i] * h[i]);
        }
}

/* saved (rows, 4n): R, Z, H_tilde, and hg's candidate block H_{t-1} W_hn + b_hn */
static inline void gru_row(long n, const float *restrict x, const float *restrict g, const float *restrict hp,
                           float *restrict h, float *restrict s) {
    for (long j = 0; j < n; j++) {
        float r = sigmoid(x[j] + g[j]);
        float z = sigmoid(x[n + j] + g[n + j]);
        float ht = tanhf(x[2 * n + j] + r * g[2 * n + j]);
        h[j] = ht + z * (hp[j] - ht);
        s[j] = r;
        s[n + j] = z;
        s[2 * n + j] = ht;
        s[3 * n + j] = g[2 * n + j];
    }
}

void gru_forward(long rows, long n, const float *restrict xg, const float *restrict hg,
                 const float *restrict h_prev, float *restrict h_out, float *restrict saved) {
    for (long b = 0; b < rows; b++)
        gru_row(n, xg + b * 3 * n, hg + b * 3 * n, h_prev + b * n, h_out + b * n, saved + b * 4 * n);
}

void gru_backward(long rows, long n, const float *restrict dmm, const float *restrict d_direct,
                  const float *restrict d_hs, const float *restrict h_prev, const float *restrict saved,
                  float *restrict dxg, float *restrict dhg, float *restrict d_direct_out) {
    for (long b = 0; b < rows; b++) {
        const float *restrict s = saved + b * 4 * n;
        long k = b * n;
        float *restrict dx = dxg + b * 3 * n, *restrict dg = dhg + b * 3 * n;
        for (long j = 0; j < n; j++) {
            float r = s[j], z = s[n + j], ht = s[2 * n + j], hn = s[3 * n + j];
            float dh = dmm[k + j] + d_direct[k + j] + d_hs[k + j];
            float d_cand = dh * (1.0f - z) * (1.0f - ht * ht);
            float d_r = d_cand * hn * r * (1.0f - r);
            float d_z = dh * (h_prev[k + j] - ht) * z * (1.0f - z);
            dx[j] = dg[j] = d_r;
            dx[n + j] = dg[n + j] = d_z;
            dx[2 * n + j] = d_cand;
            dg[2 * n + j] = d_cand * r;
            d_direct_out[k + j] = dh * z;
        }
    }
}

/* saved (rows, 5n): the gates I, F, the candidate C_tilde, O, and tanh(C_t) */
static inline void lstm_row(long n, const float *restrict x, const float *restrict g, const float *restrict cp,
                            float *restrict h, float *restrict c_out, float *restrict s) {
    for (long j = 0; j < n; j++) {
        float i = sigmoid(x[j] + g[j]);
        float f = sigmoid(x[n + j] + g[n + j]);
        float ct = tanhf(x[2 * n + j] + g[2 * n + j]);
        float o = sigmoid(x[3 * n + j] + g[3 * n + j]);
        float c = f * cp[j] + i * ct;
        float tc = tanhf(c);
        c_out[j] = c;
        h[j] = o * tc;
        s[j] = i;
        s[n + j] = f;
        s[2 * n + j] = ct;
        s[3 * n + j] = o;
        s[4 * n + j] = tc;
    }
}

void lstm_forward(long rows, long n, const float *restrict xg, const float *restrict hg,
                  const float *restrict c_prev, float *restrict h_out, float *restrict c_out,
                  float *restrict saved) {
    for (long b = 0; b < rows; b++)
        lstm_row(n, xg + b * 4 * n, hg + b * 4 * n, c_prev + b * n, h_out + b * n, c_out + b * n, saved + b * 5 * n);
}

void lstm_backward(long rows, long n, const float *restrict dmm, const float *restrict d_hs,
                   const float *restrict d_c, const float *restrict c_prev, const float *restrict saved,
                   float *restrict dxg, float *restrict d_c_out) {
    for (long b = 0; b < rows; b++) {
        const float *restrict s = saved + b * 5 * n;
        long k = b * n;
        float *restrict dx = dxg + b * 4 * n;
        for (long j = 0; j < n; j++) {
            float i = s[j], f = s[n + j], ct = s[2 * n + j], o = s[3 * n + j], tc = s[4 * n + j];
            float dh = dmm[k + j] + d_hs[k + j];
            float dc = d_c[k + j] + dh * o * (1.0f - tc * tc);
            dx[j] = dc * ct * i * (1.0f - i);
            dx[n + j] = dc * c_prev[k + j] * f * (1.0f - f);
            dx[2 * n + j] = dc * i * (1.0f - ct * ct);
            dx[3 * n + j] = dh * tc * o * (1.0f - o);
            d_c_out[k + j] = dc * f;
        }
    }
}

/* ---- The recurrence of one layer over all steps, for training: each step's product H W_hh^T
 * (forward) or dG W_hh (backward) and its gate arithmetic, in one call for all steps, on torch's
 * OpenMP threads. A per-step oneDNN product from Python cost ~15 us of fixed overhead on top of
 * ~8 us of arithmetic (32 x 256 x 256); here a step costs ~10 us. */

typedef float v16 __attribute__((vector_size(64), aligned(4)));  /* 16 floats: one AVX-512 register */
#define PANEL 32  /* columns of a packed panel of B: two vectors */
#define TILE 8    /* rows of A per tile: 8 x 2 accumulators */

/* B (K, N), B[k][j] = src[j * stride_n + k * stride_k], packed into panels of PANEL columns:
 * out[p][k][j] = B[k][p * PANEL + j], zero past column N. out holds ceil(N / PANEL) * K * PANEL. */
void pack_panels(long N, long K, const float *restrict src, long stride_n, long stride_k, float *restrict out) {
    long panels = (N + PANEL - 1) / PANEL;
    for (long p = 0; p < panels; p++)
        for (long k = 0; k < K; k++)
            for (long j = 0; j < PANEL; j++) {
                long col = p * PANEL + j;
                out[(p * K + k) * PANEL + j] = col < N ? src[col * stride_n + k * stride_k] : 0.0f;
            }
}

/* c[i][j] = bias[j] + sum over k of a[i][k] * panel[k][j], for `rows` <= TILE rows of a (row
 * stride K) and the panel's first `cols` columns; c has row stride ldc. */
static inline void product_tile(long K, const float *restrict a, long rows, const float *restrict panel,
                                const float *restrict bias, long cols, float *restrict c, long ldc) {
    float edge[PANEL] = {0};
    for (long j = 0; bias && j < cols; j++)
        edge[j] = bias[j];
    v16 b0, b1, acc[TILE][2];
    memcpy(&b0, edge, sizeof b0);
    memcpy(&b1, edge + 16, sizeof b1);
    for (int i = 0; i < TILE; i++) {
        acc[i][0] = b0;
        acc[i][1] = b1;
    }
    if (rows == TILE) {  /* the common case, fully unrolled: 16 accumulators in registers */
        for (long k = 0; k < K; k++) {
            v16 x0, x1;
            memcpy(&x0, panel + k * PANEL, sizeof x0);
            memcpy(&x1, panel + k * PANEL + 16, sizeof x1);
            #pragma GCC unroll 8
            for (int i = 0; i < TILE; i++) {
                v16 ai = (v16){} + a[i * K + k];
                acc[i][0] += ai * x0;
                acc[i][1] += ai * x1;
            }
        }
    } else {
        for (long k = 0; k < K; k++) {
            v16 x0, x1;
            memcpy(&x0, panel + k * PANEL, sizeof x0);
            memcpy(&x1, panel + k * PANEL + 16, sizeof x1);
            for (long i = 0; i < rows; i++) {
                v16 ai = (v16){} + a[i * K + k];
                acc[i][0] += ai * x0;
                acc[i][1] += ai * x1;
            }
        }
    }
    for (long i = 0; i < rows; i++) {
        memcpy(edge, &acc[i][0], sizeof b0);
        memcpy(edge + 16, &acc[i][1], sizeof b1);
        memcpy(c + i * ldc, edge, cols * sizeof(float));
    }
}

/* c (M, N) = a (M, K) @ B + bias (bias: N floats or NULL), B packed by pack_panels. Called inside
 * a parallel region, its tiles are shared among the threads (an orphaned `omp for`, ending in a
 * barrier); each element is computed by one thread in one order, whatever the thread count. */
static void panel_product(long M, long N, long K, const float *restrict a, const float *restrict packed,
                          const float *restrict bias, float *restrict c) {
    long panels = (N + PANEL - 1) / PANEL, blocks = (M + TILE - 1) / TILE;
    #pragma omp for schedule(static)
    for (long t = 0; t < panels * blocks; t++) {
        long p = t / blocks, r = t % blocks;
        long rows = M - r * TILE < TILE ? M - r * TILE : TILE, cols = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
        product_tile(K, a + r * TILE * K, rows, packed + p * K * PANEL, bias ? bias + p * PANEL : NULL, cols,
                     c + r * TILE * N + p * PANEL, N);
    }
}

/* All steps of one layer forward: for t, hg = H_{t-1} W_hh^T + b_hh (packed: W_hh^T by
 * pack_panels; hg: rows x gates*n scratch) and the cell's arithmetic, as *_forward: hs (steps,
 * rows, n), cs (LSTM), saved (steps, rows, width*n; one step's worth without `keep`). */
void recurrence_forward(int cell, long steps, long rows, long n, const float *restrict xg,
                        const float *restrict h0, const float *restrict c0, const float *restrict packed,
                        const float *restrict bias, float *restrict hg, float *restrict hs, float *restrict cs,
                        float *restrict saved, int keep) {
    long gates = cell == 0 ? 1 : cell == 1 ? 3 : 4, width = cell == 1 ? 4 : 5;
    #pragma omp parallel
    for (long t = 0; t < steps; t++) {
        const float *h_prev = t ? hs + (t - 1) * rows * n : h0;
        const float *c_prev = cell == 2 ? (t ? cs + (t - 1) * rows * n : c0) : NULL;
        float *s = cell ? saved + (keep ? t : 0) * rows * width * n : NULL;
        panel_product(rows, gates * n, n, h_prev, packed, bias, hg);
        #pragma omp for schedule(static)
        for (long b = 0; b < rows; b++) {
            const float *x = xg + (t * rows + b) * gates * n, *g = hg + b * gates * n;
            float *h = hs + (t * rows + b) * n;
            if (cell == 0)
                rnn_row(n, x, g, h);
            else if (cell == 1)
                gru_row(n, x, g, h_prev + b * n, h, s + b * width * n);
            else
                lstm_row(n, x, g, c_prev + b * n, h, cs + (t * rows + b) * n, s + b * width * n);
        }
    }
}

/* Backpropagation through all steps of `recurrence_forward` (as kernels.py's `backward` loop): for
 * t from the last, the cell's backward (*_backward) and then dmm = dhg_t W_hh (packed: W_hh by
 * pack_panels), the gradient reaching H_{t-1} through the product. dmm (rows, n) is zero on entry
 * and holds the gradient of h0's product on return; ping holds the gradient passed between steps
 * outside the product (GRU: through Z * H_{t-1}; LSTM: dC, d_c_last on entry), pong is scratch of
 * the same size: after an odd number of steps the last one is in pong. */
void recurrence_backward(int cell, long steps, long rows, long n, const float *restrict d_hs,
                         const float *restrict h0, const float *restrict c0, const float *restrict hs,
                         const float *restrict cs, const float *restrict saved, const float *restrict packed,
                         float *dxg, float *dhg, float *restrict dmm, float *ping, float *pong) {
    /* dxg and dhg are one buffer but for the GRU: not restrict */
    long gates = cell == 0 ? 1 : cell == 1 ? 3 : 4, width = cell == 1 ? 4 : 5;
    #pragma omp parallel
    {
        float *in = ping, *out = pong;  /* each thread swaps its own copies, in step */
        for (long t = steps - 1; t >= 0; t--) {
            long at = t * rows * n;
            const float *h_prev = t ? hs + at - rows * n : h0;
            float *dx = dxg + t * rows * gates * n, *dg = dhg + t * rows * gates * n;
            #pragma omp for schedule(static)
            for (long b = 0; b < rows; b++) {
                long k = b * n, kg = b * gates * n;
                if (cell == 0)
                    rnn_backward(1, n, dmm + k, d_hs + at + k, hs + at + k, dx + kg);
                else if (cell == 1)
                    gru_backward(1, n, dmm + k, in + k, d_hs + at + k, h_prev + k, saved + (at + k) * width,
                                 dx + kg, dg + kg, out + k);
                else
                    lstm_backward(1, n, dmm + k, d_hs + at + k, in + k, (t ? cs + at - rows * n : c0) + k,
                                  saved + (at + k) * width, dx + kg, out + k);
            }
            float *swap = in;
            in = out;
            out = swap;
            panel_product(rows, n, gates * n, dg, packed, NULL, dmm);
        }
    }
}

/* One generation step of one layer (a packed model's `_generation_step`): the same arithmetic as
 * *_forward, row by row, without keeping what a backward would need (`s` is scratch). Row b's
 * input gates are row ids[b] of `x` (the first layer's input table: `table_rows` rows, one per
 * character) or, with ids NULL, row b of x (an upper layer's input product). c_prev/c_out: LSTM
 * only. Returns -1, or the first row whose id is outside the table (nothing is computed then). */
long cell_step(int cell, long rows, long n, const float *restrict x, const long *restrict ids, long table_rows,
               const float *restrict hg, const float *restrict h_prev, const float *restrict c_prev,
               float *restrict h_out, float *restrict c_out) {
    long gates = cell == 0 ? 1 : cell == 1 ? 3 : 4;
    for (long b = 0; ids && b < rows; b++)
        if (ids[b] < 0 || ids[b] >= table_rows)
            return b;
    float s[5 * n];
    for (long b = 0; b < rows; b++) {
        const float *restrict xb = x + (ids ? ids[b] : b) * gates * n, *restrict g = hg + b * gates * n;
        if (cell == 0)
            rnn_row(n, xb, g, h_out + b * n);
        else if (cell == 1)
            gru_row(n, xb, g, h_prev + b * n, h_out + b * n, s);
        else
            lstm_row(n, xb, g, c_prev + b * n, h_out + b * n, c_out + b * n, s);
    }
    return -1;
}

/* seen[b, ids[b]] = 1 for each row b of a (rows, V) bool mask: the characters each row has made.
 * Returns -1, or the first row whose id is outside [0, V) (nothing is marked then). */
long mark_seen(long rows, long V, unsigned char *restrict seen, const long *restrict ids) {
    for (long b = 0; b < rows; b++)
        if (ids[b] < 0 || ids[b] >= V)
            return b;
    for (long b = 0; b < rows; b++)
        seen[b * V + ids[b]] = 1;
    return -1;
}

/* Softmax cross-entropy of `rows` rows of `V` logits against `targets`, with label smoothing
 * `eps`: per row the negative log-likelihood (nll) and the mean log-probability over the
 * vocabulary (mean_logp), and, where `dlogits` is given, the gradient of
 * loss = (1 - eps) * mean(nll) - eps * mean(mean_logp), averaged over `count` rows:
 * (p - eps / V - (1 - eps) * onehot(target)) / count. Each row stays in cache while it is read
 * three times, where torch's log_softmax, nll_loss and their backward pass over the whole
 * (rows, V) tensor about seven times. */
void cross_entropy(long rows, long V, const float *restrict logits, const long *restrict targets, float eps,
                   long count, float *restrict nll, float *restrict mean_logp, float *restrict dlogits) {
    #pragma omp parallel for schedule(static)
    for (long b = 0; b < rows; b++) {
        const float *restrict z = logits + b * V;
        float m = z[0], total = 0.0f;
        for (long j = 1; j < V; j++)
            m = z[j] > m ? z[j] : m;
        float sum = 0.0f;
        if (dlogits) {
            float *restrict d = dlogits + b * V;
            for (long j = 0; j < V; j++) {
                d[j] = expf(z[j] - m);
                sum += d[j];
                total += z[j];
            }
            float scale = 1.0f / (sum * count), shift = eps / (V * (float)count);
            for (long j = 0; j < V; j++)
                d[j] = d[j] * scale - shift;
            d[targets[b]] -= (1.0f - eps) / count;
        } else {
            for (long j = 0; j < V; j++) {
                sum += expf(z[j] - m);
                total += z[j];
            }
        }
        float lse = m + logf(sum);
        nll[b] = lse - z[targets[b]];
        mean_logp[b] = total / V - lse;
    }
}

/* The first layer's input gates for one-hot inputs, a lookup of W_ih's columns: out[p] (count,
 * width) = w[:, ids[p]] + bias, w (width, V) as torch stores it. Blocks of 16 columns of `out`
 * (16 rows of w) per thread: a block's rows of w stay in cache while every position reads them.
 * Returns -1, or the first position whose id is outside [0, V) (nothing is written then). */
long onehot_gates(long count, long width, long V, const float *restrict w, const float *restrict bias,
                  const long *restrict ids, float *restrict out) {
    for (long p = 0; p < count; p++)
        if (ids[p] < 0 || ids[p] >= V)
            return p;
    #pragma omp parallel for schedule(static)
    for (long j0 = 0; j0 < width; j0 += 16) {
        long j1 = j0 + 16 < width ? j0 + 16 : width;
        for (long p = 0; p < count; p++) {
            const float *restrict column = w + ids[p];
            float *restrict o = out + p * width;
            for (long j = j0; j < j1; j++)
                o[j] = bias ? column[j * V] + bias[j] : column[j * V];
        }
    }
    return -1;
}

/* The gradients of `onehot_gates` (ids already checked there): dw (width, V) = the sum of the
 * rows d[p] (count, width) over the positions p with ids[p] = v, in column v, zero in the columns
 * of characters not read; db (width) = the sum of all rows (db may be NULL). Positions are summed
 * in order, as torch's index_add does. */
void onehot_gates_backward(long count, long width, long V, const float *restrict d, const long *restrict ids,
                           float *restrict dw, float *restrict db) {
    #pragma omp parallel for schedule(static)
    for (long j0 = 0; j0 < width; j0 += 16) {
        long j1 = j0 + 16 < width ? j0 + 16 : width;
        for (long j = j0; j < j1; j++) {
            for (long v = 0; v < V; v++)
                dw[j * V + v] = 0.0f;
            if (db)
                db[j] = 0.0f;
        }
        for (long p = 0; p < count; p++) {
            float *restrict column = dw + ids[p];
            const float *restrict g = d + p * width;
            for (long j = j0; j < j1; j++)
                column[j * V] += g[j];
            for (long j = j0; db && j < j1; j++)
                db[j] += g[j];
        }
    }
}

/* The index of each row's largest logit (the first, on ties), for greedy decoding: the row's
 * blocks of 64 are reduced to their maxima in vector code, then the first block holding the
 * row maximum is scanned. torch's argmax over a (64, 2582) batch took ~50 us, this ~5.
 * Logits are finite or -inf (masked); -inf everywhere gives 0, as torch does. */
void argmax_rows(long rows, long V, const float *restrict logits, long *restrict out) {
    for (long b = 0; b < rows; b++) {
        const float *restrict z = logits + b * V;
        float best = z[0];
        long best_block = 0;
        for (long start = 0; start < V; start += 64) {
            long end = start + 64 < V ? start + 64 : V;
            float m = z[start];
            for (long j = start + 1; j < end; j++)
                m = z[j] > m ? z[j] : m;
            if (m > best) {
                best = m;
                best_block = start;
            }
        }
        long j = best_block;
        while (z[j] != best)
            j++;
        out[b] = j;
    }
}

/* One top-k/top-p draw for each of `count` rows (`index` into the batch), by inverse CDF over
 * the row's whole distribution, kept when the pick survives: fewer than top_k characters are
 * likelier than it and their mass is below top_p (sampling.py's `sample_fused` calls this once
 * per round of its rejection loop; a row with top_p 1 and no top_k keeps its first draw). With
 * `fresh`, the row's weights exp((logits - max) / temperature) are first written to `weights`
 * (rows, V) and the running sums of its blocks of 64 to `cdf` (rows, ceil(V / 64)), in one pass
 * after the max; later rounds reuse them. Nothing is normalised: the target is u * total and a
 * survivor's likelier-than mass is compared with top_p * total. The inverse CDF finds the
 * block, then scans it: nothing is summed one character at a time but inside one block. The
 * target stays strictly below the total, so a character of weight zero is never picked.
 * Writes picks[index[i]] and ok[i]. The rows are shared among the threads, each row drawn by
 * one: at batch 64 the engine's sampled characters/s rose ~6% on two threads. */
#define BLOCK 64
void sample_rows(long count, long V, const long *restrict index, const float *restrict logits,
                 const float *restrict temperature, const long *restrict top_k, const float *restrict top_p,
                 const double *restrict uniforms, int fresh, float *restrict weights, float *restrict cdf,
                 long *restrict picks, unsigned char *restrict ok) {
    long blocks = (V + BLOCK - 1) / BLOCK;
    #pragma omp parallel for schedule(static)
    for (long i = 0; i < count; i++) {
        long b = index[i];
        float *restrict p = weights + b * V, *restrict cum = cdf + b * blocks;
        if (fresh) {
            const float *restrict z = logits + b * V;
            float scale = 1.0f / temperature[b], m = z[0], running = 0.0f;
            for (long j = 1; j < V; j++)
                m = z[j] > m ? z[j] : m;
            for (long k = 0; k < blocks; k++) {
                long end = (k + 1) * BLOCK < V ? (k + 1) * BLOCK : V;
                float part = 0.0f;
                for (long j = k * BLOCK; j < end; j++) {
                    p[j] = expf((z[j] - m) * scale);
                    part += p[j];
                }
                running += part;
                cum[k] = running;
            }
        }
        float total = cum[blocks - 1];
        float target = (float)uniforms[i] * total;
        float below = nextafterf(total, 0.0f);
        target = target < below ? target : below;
        long k = 0;
        while (cum[k] <= target)  /* the first block whose running sum passes the target */
            k++;
        long start = k * BLOCK, end = start + BLOCK < V ? start + BLOCK : V, pick = -1, last = start;
        float running = k ? cum[k - 1] : 0.0f;
        for (long j = start; j < end; j++) {
            if (p[j] > 0.0f)
                last = j;
            running += p[j];
            if (running > target) {
                pick = j;
                break;
            }
        }
        if (pick < 0 || p[pick] <= 0.0f)  /* the in-block sum fell short of the block's by rounding */
            pick = last;
        picks[b] = pick;
        float chosen = p[pick], mass = 0.0f;
        long likelier = 0;
        for (long j = 0; j < V; j++) {
            mass += p[j] > chosen ? p[j] : 0.0f;
            likelier += p[j] > chosen;
        }
        ok[i] = (top_p[b] >= 1.0f || mass < top_p[b] * total) && likelier < top_k[b];
    }
}

/* The cache component of a mixture (mixture.py's HistoryCache, which is the reference and what
 * runs elsewhere). Each row of `text` (rows, length) holds character ids, -1 where empty; for
 * every window text[b, t:t + window] (steps = length - window + 1 of them), the Witten-Bell
 * distribution p (rows, steps, V) of the character after it and its bucket (rows, steps): the
 * longest matched context, 0..order. Instead of a vocabulary-wide count array per context
 * length, each position j's match length m_j (how many of the window's last characters also end
 * at j) is counted once per follower: counts_k[w], the positions followed by w whose match is at
 * least k, are suffix sums of those few histograms, and p[w] = sum_k coef_k counts_k[w] + rest / V
 * touches only the followers seen. The windows are shared among the threads. Returns -1, or the
 * first row holding an id >= V (its p is not computed), or -2 when scratch memory could not be
 * had. */
long history_cache(long rows, long length, long window, long order, long V, const int *restrict text,
                   float *restrict p, long *restrict bucket) {
    long steps = length - window + 1, bad = -1;
    int failed = 0;
    #pragma omp parallel
    {
        long slots = order + 2;  /* hist[w]: positions by match length 0..order, then their total */
        int *hist = calloc((size_t)(V * slots), sizeof(int));
        int *touched = malloc((size_t)window * sizeof(int));
        if (!hist || !touched) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (long i = 0; i < rows * steps; i++) {
            if (!hist || !touched)
                continue;
            long b = i / steps;
            const int *restrict h = text + b * length + i % steps;
            long last = window - 1, n_touched = 0, out_of_range = 0;
            for (long j = 0; j + 1 < window; j++) {
                int w = h[j + 1];
                if (w < 0)
                    continue;
                if (w >= V) {
                    out_of_range = 1;
                    break;
                }
                long m = 0;
                while (m < order && m <= j && h[last - m] >= 0 && h[j - m] == h[last - m])
                    m++;
                int *hw = hist + w * slots;
                if (hw[order + 1]++ == 0)
                    touched[n_touched++] = w;
                hw[m]++;
            }
            if (out_of_range) {
                for (long t = 0; t < n_touched; t++)
                    memset(hist + touched[t] * slots, 0, (size_t)slots * sizeof(int));
                #pragma omp critical
                bad = bad < 0 || b < bad ? b : bad;
                continue;
            }
            float totals[order + 1], types[order + 1], own[order + 1], carry[order + 1], coef[order + 1];
            for (long k = 0; k <= order; k++)
                totals[k] = types[k] = 0.0f;
            for (long t = 0; t < n_touched; t++) {  /* counts_k[w] = the positions with match >= k */
                int *hw = hist + touched[t] * slots, at_least = 0;
                for (long k = order; k >= 0; k--) {
                    at_least += hw[k];
                    totals[k] += (float)at_least;
                    types[k] += at_least > 0;
                }
            }
            float rest = 1.0f, later = 1.0f;
            long matched = 0;
            for (long k = 0; k <= order; k++) {
                int seen = totals[k] > 0.0f;
                float sum = totals[k] + types[k];
                own[k] = seen ? 1.0f / (sum > 1.0f ? sum : 1.0f) : 0.0f;
                carry[k] = seen ? types[k] * own[k] : 1.0f;
                rest *= carry[k];
                matched += k > 0 && seen;
            }
            for (long k = order; k >= 0; k--) {  /* coef_k = own_k * the carries of every longer context */
                coef[k] = own[k] * later;
                later *= carry[k];
            }
            rest /= (float)V;
            float *restrict pi = p + i * V;
            for (long w = 0; w < V; w++)
                pi[w] = rest;
            for (long t = 0; t < n_touched; t++) {
                int *hw = hist + touched[t] * slots, at_least = 0;
                float sum = 0.0f;
                for (long k = order; k >= 0; k--) {
                    at_least += hw[k];
                    sum += coef[k] * (float)at_least;
                }
                pi[touched[t]] = sum + rest;
                memset(hw, 0, (size_t)slots * sizeof(int));
            }
            bucket[i] = matched;
        }
        free(hist);
        free(touched);
    }
    return failed ? -2 : bad;
}

/* A mixture's log-probabilities (mixture.py's forward), one row at a time: log(w_rnn
 * softmax(logits) + w_ngram p_ngram + w_cache p_cache), floored at 1e-30, with the row's weights
 * (rows, 3) in mixture.py's order (rnn, ngram, cache); `ngram` may be NULL (no n-gram). `out`
 * holds the row's exponentials on the way. Rows are shared among the threads. */
void mix_log_probs(long rows, long V, const float *restrict logits, const float *restrict weights,
                   const float *restrict ngram, const float *restrict cache, float *restrict out) {
    #pragma omp parallel for schedule(static)
    for (long b = 0; b < rows; b++) {
        const float *restrict z = logits + b * V, *restrict pc = cache + b * V, *restrict w = weights + b * 3;
        float *restrict o = out + b * V, m = z[0], sum = 0.0f;
        for (long j = 1; j < V; j++)
            m = z[j] > m ? z[j] : m;
        for (long j = 0; j < V; j++) {
            o[j] = expf(z[j] - m);
            sum += o[j];
        }
        float scale = w[0] / sum;
        if (ngram) {
            const float *restrict pn = ngram + b * V;
            for (long j = 0; j < V; j++) {
                float x = o[j] * scale + w[1] * pn[j] + w[2] * pc[j];
                o[j] = logf(x > 1e-30f ? x : 1e-30f);
            }
        } else {
            for (long j = 0; j < V; j++) {
                float x = o[j] * scale + w[2] * pc[j];
                o[j] = logf(x > 1e-30f ? x : 1e-30f);
            }
        }
    }
}

/* A Kneser-Ney n-gram's next-character distributions (ngram.py's KneserNey.distribution, which
 * is the reference and what runs elsewhere), one row of `contexts` (rows, width) at a time: the
 * row's last ids, oldest first, -1 where the text had not begun (skipped). The tables, as
 * ngram.py flattens them: order k's contexts are k ids each, sorted, at ctx_ids + ctx_start[k], ctx_count[k] of them,
 * numbered from ctx_first[k]; context g's characters and discounted probabilities are
 * next[entry[g]..entry[g + 1]) and value[...], its back-off weight gamma[g]. Starting from the
 * uniform distribution, each order whose context (the row's last k ids) was seen scales p by its
 * gamma and adds its values, in double as numpy does; the first unseen context ends the walk.
 * Writes out (rows, V) as float32. Rows are shared among the threads. Returns -1, or -2 when
 * scratch memory could not be had. */
static long find_context(const int *restrict table, long count, long k, const int *restrict key) {
    long lo = 0, hi = count;
    while (lo < hi) {
        long mid = (lo + hi) / 2, cmp = 0;
        for (long i = 0; i < k && !cmp; i++)
            cmp = table[mid * k + i] < key[i] ? -1 : table[mid * k + i] > key[i];
        if (cmp == 0)
            return mid;
        if (cmp < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return -1;
}

long ngram_distributions(long rows, long width, long order, long V, const int *restrict contexts,
                         const int *restrict ctx_ids, const long *restrict ctx_start, const long *restrict ctx_count,
                         const long *restrict ctx_first, const long *restrict entry, const int *restrict next,
                         const double *restrict value, const double *restrict gamma, float *restrict out) {
    int failed = 0;
    #pragma omp parallel
    {
        double *p = malloc((size_t)V * sizeof(double));
        if (!p) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (long b = 0; b < rows; b++) {
            const int *restrict row = contexts + b * width;
            int ids[width + 1];  /* the row's ids without the -1s */
            long known = 0;
            for (long i = 0; i < width; i++)
                if (row[i] >= 0)
                    ids[known++] = row[i];
            float *restrict o = out + b * V;
            if (!p)
                continue;
            for (long j = 0; j < V; j++)
                p[j] = 1.0 / (double)V;
            for (long k = 0; k < order && k <= known; k++) {
                long at = find_context(ctx_ids + ctx_start[k], ctx_count[k], k, ids + known - k);
                if (at < 0)
                    break;
                long g = ctx_first[k] + at;
                double scale = gamma[g];
                for (long j = 0; j < V; j++)
                    p[j] *= scale;
                for (long e = entry[g]; e < entry[g + 1]; e++)
                    p[next[e]] += value[e];
            }
            for (long j = 0; j < V; j++)
                o[j] = (float)p[j];
        }
        free(p);
    }
    return failed ? -2 : -1;
}

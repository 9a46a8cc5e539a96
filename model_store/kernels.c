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
 * Writes picks[index[i]] and ok[i]. */
#define BLOCK 64
void sample_rows(long count, long V, const long *restrict index, const float *restrict logits,
                 const float *restrict temperature, const long *restrict top_k, const float *restrict top_p,
                 const double *restrict uniforms, int fresh, float *restrict weights, float *restrict cdf,
                 long *restrict picks, unsigned char *restrict ok) {
    long blocks = (V + BLOCK - 1) / BLOCK;
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

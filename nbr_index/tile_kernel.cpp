// Per-tile statistics of the fused pass on CPU, in one read of the tile (see fused.py).
//
// Input: a (rows x cols) tile of raw float32 dot products g, row stride ld, between row block I
// (the tile's rows) and row block J (its columns). With the logits y = scale * g - shift (base-2
// units; shift is the pass's global bound, so y <= ~0), it ADDS, in fixed point (round(x * unit),
// int64, so that sums are exact and independent of the order in which tiles are added):
//
//   row_exp_sum[r] += sum_c 2^y[r,c]      row_exp_dot[r] += sum_c 2^y[r,c] * y[r,c]
//   col_exp_sum[c] += sum_r 2^y[r,c]      col_exp_dot[c] += sum_r 2^y[r,c] * y[r,c]   (if columns)
//
// and WRITES the largest g of each row (row_max) and, with columns, of each column (col_max),
// merging them into a running top-1 when one is given (see the function). The column side is the
// transposed tile, i.e. what rows of J see of rows of I: an off-diagonal tile of the symmetric
// pass updates both blocks from one GEMM. A diagonal tile (diagonal != 0, rows == cols, I == J)
// holds every pair of its block already; its self entries g[r,r] count in the sums (the entropy
// includes self) but not in the maxima (a row is not its own neighbour), and are left at -inf in
// the tile so that a later index search on the tile skips them too.
//
// 2^y: y = n + f with n = round(y), |f| <= 1/2; 2^f by a degree-5 minimax polynomial (relative
// error 9e-8, 1.9e-7 evaluated in float32, about 1 ulp); 2^n added into the exponent bits. Valid
// for y >= -126: when the pass's logits can go lower (only at tiny tau) they are clamped there,
// a term below 2^-126 next to a row's self term (~1) changing nothing visible. Sums of a row are
// float32 per SIMD lane (<= cols/8 terms each); column sums are float32 over at most FLUSH_ROWS
// rows, then added in float64. Written with GCC/Clang vector extensions: AVX2 code with
// -march=native on x86, NEON on ARM.

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int W = 8;  // lanes per vector (two 128-bit registers where 256-bit ones do not exist)
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
constexpr int64_t FLUSH_ROWS = 128;
constexpr float LOWEST_LOGIT = -126.0f;

// The same code runs on vectors of W lanes (the body of a row) and on single floats (its ragged
// tail): these overloads are all that differs.
inline vf load(const float* p, vf) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline float load(const float* p, float) { return *p; }
inline vi load_index(const int32_t* p, vf) { vi v; std::memcpy(&v, p, sizeof v); return v; }
inline int32_t load_index(const int32_t* p, float) { return *p; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void store(float* p, float v) { *p = v; }
inline void store_index(int32_t* p, vi v) { std::memcpy(p, &v, sizeof v); }
inline void store_index(int32_t* p, int32_t v) { *p = v; }
inline vf select(vi mask, vf a, vf b) { return mask ? a : b; }
inline float select(bool mask, float a, float b) { return mask ? a : b; }
inline vi select(vi mask, int32_t a, vi b) { return mask ? (vi{} + a) : b; }
inline int32_t select(bool mask, int32_t a, int32_t b) { return mask ? a : b; }
inline vi bits(vf v) { return (vi)v; }
inline int32_t bits(float v) { int32_t b; std::memcpy(&b, &v, sizeof b); return b; }
inline vf from_bits(vi b) { return (vf)b; }
inline float from_bits(int32_t b) { float v; std::memcpy(&v, &b, sizeof v); return v; }
inline vf splat(float x) { return vf{} + x; }

constexpr float C1 = 6.931469776e-01f, C2 = 2.402224208e-01f, C3 = 5.550733744e-02f,
                C4 = 9.671512859e-03f, C5 = 1.326472746e-03f;
constexpr float ROUNDING = 12582912.0f;  // 1.5 * 2^23: x + it rounds x to an integer in the low bits

// 2^y for y in [-126, ~0]. (bits of y + 1.5 * 2^23) << 23 is n << 23 (the rest shifts out), and
// adding it to the bits of 2^f (in [0.7, 1.42]) multiplies by 2^n.
template <class V> inline V exp2_of(V y) {
    V shifted = y + ROUNDING;
    V f = y - (shifted - ROUNDING);
    V p = (((C5 * f + C4) * f + C3) * f + C2) * f + C1;
    p = p * f + 1.0f;
    return from_bits(bits(p) + static_cast<decltype(bits(p))>(bits(shifted) << 23));
}

template <bool CLAMP, class V> inline V logits(V value, float scale, float shift) {
    V y = scale * value - shift;
    if (CLAMP) y = select(y > LOWEST_LOGIT, y, V{} + LOWEST_LOGIT);
    return y;
}

inline int64_t fixed(double value, double unit) { return std::llrint(value * unit); }

// Merge the candidate (value, index) into a running best (value, index): larger value wins, an equal
// value goes to the lower index.
inline void merge_best(float value, int64_t index, float* best_value, int64_t* best_index) {
    if (value > *best_value || (value == *best_value && index < *best_index)) {
        *best_value = value;
        *best_index = index;
    }
}

struct Tile {
    float* g; int64_t ld, rows, cols; float scale, shift; double unit; int64_t row_base, col_base;
    int64_t *row_exp_sum, *row_exp_dot; float* row_max;
    int64_t *col_exp_sum, *col_exp_dot; float* col_max;
    float* row_best; int64_t* row_best_index; float* col_best; int64_t* col_best_index; int64_t best_stride;
    double* scratch;
};

inline float row_maximum(const float* row, int64_t cols) {
    const int64_t vector_cols = cols - cols % W;
    vf best = splat(-INFINITY);
    for (int64_t c = 0; c < vector_cols; c += W) best = select(load(row + c, vf{}) > best, load(row + c, vf{}), best);
    float maximum = -INFINITY;
    for (int i = 0; i < W; ++i) maximum = best[i] > maximum ? best[i] : maximum;
    for (int64_t c = vector_cols; c < cols; ++c) maximum = row[c] > maximum ? row[c] : maximum;
    return maximum;
}

// Columns c.. of one row (V: W of them, or one): into the row's sums and maximum and, with
// COLUMNS, the column accumulators.
template <bool COLUMNS, bool CLAMP, class V>
inline void accumulate(const Tile& t, const float* row, int64_t c, int32_t r, float* col_sum32, float* col_dot32,
                       int32_t* col_max_row, V& sum, V& dot, V& best) {
    V value = load(row + c, V{});
    V y = logits<CLAMP>(value, t.scale, t.shift);
    V e = exp2_of(y);
    sum += e;
    dot += e * y;
    best = select(value > best, value, best);
    if (COLUMNS) {
        store(col_sum32 + c, load(col_sum32 + c, V{}) + e);
        store(col_dot32 + c, load(col_dot32 + c, V{}) + e * y);
        V column_best = load(t.col_max + c, V{});
        auto better = value > column_best;  // strict: the earlier (lower) row wins a tie
        store(t.col_max + c, select(better, value, column_best));
        store_index(col_max_row + c, select(better, r, load_index(col_max_row + c, V{})));
    }
}

// One row's sums and maximum; with COLUMNS, its contributions to the column accumulators too.
template <bool COLUMNS, bool CLAMP>
inline void row_pass(const Tile& t, const float* row, int32_t r, float* col_sum32, float* col_dot32,
                     int32_t* col_max_row, float& row_sum, float& row_dot, float& maximum) {
    const int64_t vector_cols = t.cols - t.cols % W;
    vf sum = splat(0.0f), dot = splat(0.0f), best = splat(-INFINITY);
    for (int64_t c = 0; c < vector_cols; c += W) {
        accumulate<COLUMNS, CLAMP>(t, row, c, r, col_sum32, col_dot32, col_max_row, sum, dot, best);
    }
    row_sum = 0.0f; row_dot = 0.0f; maximum = -INFINITY;
    for (int i = 0; i < W; ++i) {
        row_sum += sum[i];
        row_dot += dot[i];
        maximum = best[i] > maximum ? best[i] : maximum;
    }
    for (int64_t c = vector_cols; c < t.cols; ++c) {  // the ragged tail, one column at a time
        accumulate<COLUMNS, CLAMP>(t, row, c, r, col_sum32, col_dot32, col_max_row, row_sum, row_dot, maximum);
    }
}

template <bool DIAGONAL, bool COLUMNS, bool CLAMP>
void tile_statistics(const Tile& t) {
    double* col_sum64 = t.scratch;
    double* col_dot64 = t.scratch + t.cols;
    float* col_sum32 = reinterpret_cast<float*>(t.scratch + 2 * t.cols);
    float* col_dot32 = col_sum32 + t.cols;
    int32_t* col_max_row = reinterpret_cast<int32_t*>(t.scratch + 3 * t.cols);
    if (COLUMNS) {
        for (int64_t c = 0; c < t.cols; ++c) {
            col_sum64[c] = 0.0; col_dot64[c] = 0.0; col_sum32[c] = 0.0f; col_dot32[c] = 0.0f;
            t.col_max[c] = -INFINITY; col_max_row[c] = 0;
        }
    }
    for (int64_t r = 0; r < t.rows; ++r) {
        float* row = t.g + r * t.ld;
        float row_sum, row_dot, maximum;
        row_pass<COLUMNS, CLAMP>(t, row, static_cast<int32_t>(r), col_sum32, col_dot32, col_max_row,
                                 row_sum, row_dot, maximum);
        if (DIAGONAL) {
            // The sums above include the self term, as they should; the maximum must not: drop
            // the self entry and take the maximum again (the row is in L1 by now).
            row[r] = -INFINITY;
            maximum = row_maximum(row, t.cols);
        }
        t.row_exp_sum[r] += fixed(row_sum, t.unit);
        t.row_exp_dot[r] += fixed(row_dot, t.unit);
        t.row_max[r] = maximum;
        if (t.row_best != nullptr && maximum != -INFINITY && maximum >= t.row_best[r * t.best_stride]) {
            int64_t c = 0;
            while (row[c] != maximum) ++c;  // the first (lowest) column holding it, in L1
            merge_best(maximum, t.row_base + c, t.row_best + r * t.best_stride,
                       t.row_best_index + r * t.best_stride);
        }
        if (COLUMNS && ((r + 1) % FLUSH_ROWS == 0 || r + 1 == t.rows)) {
            for (int64_t c = 0; c < t.cols; ++c) {
                col_sum64[c] += col_sum32[c];
                col_dot64[c] += col_dot32[c];
                col_sum32[c] = 0.0f;
                col_dot32[c] = 0.0f;
            }
        }
    }
    if (COLUMNS) {
        for (int64_t c = 0; c < t.cols; ++c) {
            t.col_exp_sum[c] += fixed(col_sum64[c], t.unit);
            t.col_exp_dot[c] += fixed(col_dot64[c], t.unit);
            if (t.col_best != nullptr && t.col_max[c] != -INFINITY) {
                merge_best(t.col_max[c], t.col_base + col_max_row[c], t.col_best + c * t.best_stride,
                           t.col_best_index + c * t.best_stride);
            }
        }
    }
}

template <bool CLAMP> void dispatch(const Tile& t, bool diagonal) {
    if (diagonal) tile_statistics<true, false, CLAMP>(t);
    else if (t.col_exp_sum != nullptr) tile_statistics<false, true, CLAMP>(t);
    else tile_statistics<false, false, CLAMP>(t);
}

}  // namespace

// row_max[r] / col_max[c]: the largest candidate of each row / column (-inf if none).
// row_best..col_best_index (optional, the running top-1 of the rows of I and of J, stride
// best_stride): merged here. A row's first maximal column is found by a scan of the row (in L1)
// only when its maximum reaches the running best (after the first tiles, rarely); a column's
// first maximal row is tracked in the loop (a strided scan would miss the cache). Global
// indices: row_base + column for the rows' candidates, col_base + row for the columns'.
// clamp: the logits may go below -126 (tiny tau). scratch: 4 * cols doubles.
extern "C" int nbr_tile_statistics(
    float* g, int64_t ld, int64_t rows, int64_t cols, float scale, float shift, int32_t diagonal,
    int32_t clamp, double unit, int64_t row_base, int64_t col_base,
    int64_t* row_exp_sum, int64_t* row_exp_dot, float* row_max,
    int64_t* col_exp_sum, int64_t* col_exp_dot, float* col_max,
    float* row_best, int64_t* row_best_index, float* col_best, int64_t* col_best_index, int64_t best_stride,
    double* scratch) {
    if (diagonal && (rows != cols || col_exp_sum != nullptr)) return -1;
    const Tile t{g, ld, rows, cols, scale, shift, unit, row_base, col_base, row_exp_sum, row_exp_dot, row_max,
                 col_exp_sum, col_exp_dot, col_max, row_best, row_best_index, col_best, col_best_index,
                 best_stride, scratch};
    if (clamp) dispatch<true>(t, diagonal);
    else dispatch<false>(t, diagonal);
    return 0;
}

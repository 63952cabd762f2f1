// Fused exact kNN: squared Euclidean distances and top-k selection in one pass, nothing N x N stored.
//
// Grid (ceil(N / THREADS), splits). Each thread owns one query row: the row lives in registers
// (padded with zeros to D, a multiple of 4), its sorted list of the K best (distance, index) pairs too.
// The block streams the database rows of its split [split_begin, split_end) through shared memory,
// TILE rows at a time; every thread reads the same tile row at once (a broadcast, no bank conflicts)
// and accumulates (q - x)^2 directly, so near neighbours keep full fp32 precision.
// The query itself is skipped by index. With one split the lists are the answer; with several,
// knn_merge_k* merges each row's per-split lists (the extra splits keep the GPU busy when N is small).
//
// Distances are squared; the caller takes the square root (or halves them for cosine on unit rows).
#include "knn_select.cuh"

namespace {

constexpr int THREADS = 128;
constexpr int TILE = 32;

template <int K, int D>
__device__ void topk_rows(const float* __restrict__ x, int n, int dim, int cols_per_split,
                          float* __restrict__ out_dist, long long* __restrict__ out_idx) {
    static_assert(D % 4 == 0, "D must be a multiple of 4");
    __shared__ __align__(16) float tile[TILE][D];

    const int query = blockIdx.x * THREADS + threadIdx.x;
    const int split = blockIdx.y;
    const int begin = split * cols_per_split;
    const int end = min(n, begin + cols_per_split);

    float q[D];
    const bool active = query < n;
#pragma unroll
    for (int j = 0; j < D; ++j) q[j] = (active && j < dim) ? x[static_cast<long long>(query) * dim + j] : 0.0f;

    float best_dist[K];
    int best_idx[K];
    knn::clear(best_dist, best_idx);

    for (int tile_begin = begin; tile_begin < end; tile_begin += TILE) {
        for (int e = threadIdx.x; e < TILE * D; e += THREADS) {
            const int row = e / D, j = e % D;
            const int col = tile_begin + row;
            tile[row][j] = (col < end && j < dim) ? x[static_cast<long long>(col) * dim + j] : 0.0f;
        }
        __syncthreads();
        const int rows = min(TILE, end - tile_begin);
        if (active) {
            for (int row = 0; row < rows; ++row) {
                const float4* t = reinterpret_cast<const float4*>(tile[row]);
                float acc = 0.0f;
#pragma unroll
                for (int j4 = 0; j4 < D / 4; ++j4) {
                    const float4 v = t[j4];
                    const float d0 = q[4 * j4] - v.x, d1 = q[4 * j4 + 1] - v.y;
                    const float d2 = q[4 * j4 + 2] - v.z, d3 = q[4 * j4 + 3] - v.w;
                    acc = fmaf(d0, d0, acc);
                    acc = fmaf(d1, d1, acc);
                    acc = fmaf(d2, d2, acc);
                    acc = fmaf(d3, d3, acc);
                }
                const int col = tile_begin + row;
                if (col != query) knn::insert(best_dist, best_idx, acc, col);
            }
        }
        __syncthreads();
    }

    if (active) {
        const long long base = (static_cast<long long>(split) * n + query) * K;
#pragma unroll
        for (int s = 0; s < K; ++s) {
            out_dist[base + s] = best_dist[s];
            out_idx[base + s] = best_idx[s] == knn::empty_index<int>() ? knn::empty_index<long long>()
                                                                        : static_cast<long long>(best_idx[s]);
        }
    }
}

template <int K>
__device__ void merge_rows(const float* __restrict__ part_dist, const long long* __restrict__ part_idx, int n,
                           int splits, float* __restrict__ out_dist, long long* __restrict__ out_idx) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n) return;
    float acc_dist[K], tmp_dist[K];
    long long acc_idx[K], tmp_idx[K];
    for (int s = 0; s < K; ++s) {
        acc_dist[s] = part_dist[static_cast<long long>(row) * K + s];
        acc_idx[s] = part_idx[static_cast<long long>(row) * K + s];
    }
    for (int split = 1; split < splits; ++split) {
        const long long base = (static_cast<long long>(split) * n + row) * K;
        knn::merge<K>(acc_dist, acc_idx, part_dist + base, part_idx + base, tmp_dist, tmp_idx);
        for (int s = 0; s < K; ++s) {
            acc_dist[s] = tmp_dist[s];
            acc_idx[s] = tmp_idx[s];
        }
    }
    for (int s = 0; s < K; ++s) {
        out_dist[static_cast<long long>(row) * K + s] = acc_dist[s];
        out_idx[static_cast<long long>(row) * K + s] = acc_idx[s];
    }
}

}  // namespace

// C names, so that a prebuilt cubin and an NVRTC build expose the same symbols:
// knn_topk_k{K}_d{D}(x [n, dim] fp32, n, dim, cols_per_split, out_dist [splits, n, K], out_idx [splits, n, K])
// knn_merge_k{K}(part_dist, part_idx, n, splits, out_dist [n, K], out_idx [n, K])
#define KNN_TOPK(K, D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS) knn_topk_k##K##_d##D(                              \
        const float* __restrict__ x, int n, int dim, int cols_per_split, float* __restrict__ out_dist,         \
        long long* __restrict__ out_idx) {                                                                    \
        topk_rows<K, D>(x, n, dim, cols_per_split, out_dist, out_idx);                                        \
    }
#define KNN_MERGE(K)                                                                                          \
    extern "C" __global__ void knn_merge_k##K(const float* __restrict__ part_dist,                            \
                                              const long long* __restrict__ part_idx, int n, int splits,      \
                                              float* __restrict__ out_dist, long long* __restrict__ out_idx) { \
        merge_rows<K>(part_dist, part_idx, n, splits, out_dist, out_idx);                                     \
    }

KNN_TOPK(8, 32)
KNN_TOPK(8, 64)
KNN_TOPK(8, 128)
KNN_TOPK(16, 32)
KNN_TOPK(16, 64)
KNN_TOPK(16, 128)
KNN_TOPK(32, 32)
KNN_TOPK(32, 64)
KNN_TOPK(32, 128)
KNN_MERGE(8)
KNN_MERGE(16)
KNN_MERGE(32)

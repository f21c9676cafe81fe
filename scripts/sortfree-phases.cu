// Where the CUDA sortfree sampler spends its time, without a llama.cpp build: this file includes the kernel
// source of the patched tree and times it in isolation (CUDA events over a CUDA graph of back-to-back launches,
// and single launches), for input variants that switch its stages on one by one:
//
//   empty      a kernel with the same launch shape (cluster, threads, shared memory) that does nothing
//   greedy     temp 0: the max pass and its cluster reduction, then a second pass for the lowest index
//   topk       top-k 40 only: the candidate path (threshold, gather into the first block, k-th selection, draw)
//   topk-minp  top-k 40, min-p 0.05, temp 0.8
//   full       top-k 40, top-p 0.9, min-p 0.05, temp 0.8 (the issue's configuration): adds the top-p rounds
//   topp       top-p 0.9 alone: the dense path over the whole row
//
// With -DSORTFREE_REF=\"path/to/another/sample-sortfree.cu\" (for example the file of an earlier commit, see
// scripts/sortfree-ref-kernel) it first checks that both kernels draw the same token for every row of many inputs
// (special rows and parameters included), so that a faster kernel can be compared with a known-good one without a
// full build, and then times the reference right after the kernel for every case (same process, same inputs).
//
// Build and run (on the GPU machine, from the repository root, after `pyharness patches apply`):
//   nvcc -O3 -std=c++17 -arch=sm_90 -Ivendor/llama.cpp/ggml/include -Ivendor/llama.cpp/ggml/src \
//       -Ivendor/llama.cpp/ggml/src/ggml-cuda scripts/sortfree-phases.cu -o sortfree-phases && ./sortfree-phases
// (scripts/gpu-check sortfree-phases does this; $SORTFREE_SRC and $SORTFREE_REF name other kernel files)

#ifdef SORTFREE_REF
#include <cooperative_groups.h>
#include <climits>
#include <type_traits>
#include "common.cuh"
namespace ref {
#include SORTFREE_REF
}
#undef SORTFREE_CLUSTERS
#undef SORTFREE_DEVICE_CLUSTERS
#undef SORTFREE_THREADS
#undef SORTFREE_WARPS
#undef SORTFREE_CHUNK
#undef SORTFREE_MAX_CHUNK
#undef SORTFREE_MAX_CAND
#undef SORTFREE_MAX_TOPK
#undef SORTFREE_MAX_CLUSTER
#undef SORTFREE_WARP_CAND
#undef SORTFREE_REG_CHUNKS
#endif // SORTFREE_REF

// -DSORTFREE_MARKS: a kernel file with SORTFREE_MARK(i) calls (0 <= i < 16) records the SM clock of the first thread
// of the first block at each, and the cycles between marks are printed after every timed variant
#ifdef SORTFREE_MARKS
__device__ long long sortfree_marks[16];
#define SORTFREE_MARK(i) do { if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0) { sortfree_marks[i] = clock64(); } } while (0)
#endif // SORTFREE_MARKS

#ifndef SORTFREE_SRC
#define SORTFREE_SRC "../vendor/llama.cpp/ggml/src/ggml-cuda/sample-sortfree.cu"
#endif
#include SORTFREE_SRC

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <random>
#include <vector>

// the few symbols of ggml and ggml-cuda that the kernel file needs
void ggml_abort(const char * file, int line, const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "%s:%d: ", file, line);
    vfprintf(stderr, fmt, args);
    va_end(args);
    fprintf(stderr, "\n");
    abort();
}

void ggml_cuda_error(const char * stmt, const char * func, const char * file, int line, const char * msg) {
    fprintf(stderr, "CUDA error: %s\n  in %s at %s:%d: %s\n", msg, func, file, line, stmt);
    abort();
}

int ggml_cuda_get_device() {
    int id;
    CUDA_CHECK(cudaGetDevice(&id));
    return id;
}

// referenced by ggml_cuda_op_sample_sortfree, which this program does not call
bool ggml_is_contiguous(const struct ggml_tensor *) {
    abort();
}

const ggml_cuda_device_info & ggml_cuda_info() {
    abort();
}

void ggml_cuda_set_device(int) {
    abort();
}

template <int C>
static __global__ void __launch_bounds__(SORTFREE_THREADS, 1) empty_kernel(int32_t * dst) {
    extern __shared__ char smem[];
    if (threadIdx.x == 0 && blockIdx.x % C == 0) {
        dst[blockIdx.y] = (int32_t) smem[0];
    }
}

template <int C>
static void launch_empty(int32_t * dst, int64_t nrows, cudaStream_t stream) {
    const size_t smem = sizeof(sortfree_shared);
    CUDA_CHECK(cudaFuncSetAttribute(empty_kernel<C>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    if (C > 8) {
        CUDA_CHECK(cudaFuncSetAttribute(empty_kernel<C>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim          = dim3(C, nrows, 1);
    cfg.blockDim         = dim3(SORTFREE_THREADS, 1, 1);
    cfg.dynamicSmemBytes = smem;
    cfg.stream           = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id               = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = C;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs    = attr;
    cfg.numAttrs = C > 1 ? 1 : 0;
    CUDA_CHECK(cudaLaunchKernelEx(&cfg, empty_kernel<C>, dst));
}

// the same choice of blocks per row as ggml_cuda_op_sample_sortfree
static int pick_cluster(int64_t n, int64_t nrows, int nsm) {
    int C = 1;
    while (2*C <= SORTFREE_MAX_CLUSTER && nrows*2*C <= nsm && n/(2*C) >= 8192) {
        C *= 2;
    }
    return C;
}

static void launch(bool empty, int C, const float * x, const float * u, int32_t * dst, const sortfree_params & p,
        int64_t nrows, cudaStream_t stream) {
    switch (C) {
#define SORTFREE_CASE(c) case c: empty ? launch_empty<c>(dst, nrows, stream) \
                                       : sample_sortfree_launch<c>(x, u, dst, p, nrows, stream); break;
        SORTFREE_CASE(1) SORTFREE_CASE(2) SORTFREE_CASE(4) SORTFREE_CASE(8) SORTFREE_CASE(16)
#undef SORTFREE_CASE
        default: abort();
    }
}

struct variant {
    const char * name;
    bool  empty;
    float temp;
    int   top_k;
    float top_p;
    float min_p;
};

static sortfree_params make_params(int64_t n, int64_t n_u, float temp, int top_k, float top_p, float min_p) {
    // as ggml_sample_sortfree stores them
    sortfree_params p;
    p.n         = n;
    p.n_u       = n_u;
    p.s01       = n;
    p.s11       = n_u;
    p.top_k     = top_k;
    p.top_p     = top_p;
    p.min_p     = min_p;
    p.temp      = temp;
    p.log_min_p = min_p > 0.0f ? logf(min_p) : -INFINITY;
    p.inv_temp  = temp > 0.0f ? 1.0f/temp : 1.0f;
    return p;
}

// rows like test-backend-ops' cases: kind 0 plain, 1 ties, 2 many -inf and a NaN, 3 a single finite logit,
// 4 all equal, 5 a few +inf; logits of a small scale in kind 6 (many candidates)
static void fill_rows(std::mt19937 & rng, int64_t n, int64_t nrows, bool special, std::vector<float> & hx) {
    std::normal_distribution<float> dnorm(0.0f, 1.0f);
    std::uniform_real_distribution<float> dunif(0.0f, 1.0f);
    std::uniform_int_distribution<int64_t> dtok(0, n - 1);
    hx.resize(n*nrows);
    for (int64_t r = 0; r < nrows; ++r) {
        float * d = hx.data() + r*n;
        const int kind = special ? (int) (r % 7) : 0;
        const float scale = kind == 6 ? 0.01f : 1.0f + 3.0f*dunif(rng);
        for (int64_t i = 0; i < n; ++i) {
            d[i] = scale*dnorm(rng);
        }
        for (int i = 0; i < 8; ++i) {
            d[dtok(rng)] += 4.0f*scale*dunif(rng);
        }
        if (kind == 1) {
            const float vmax = *std::max_element(d, d + n);
            const float vmid = d[dtok(rng)];
            for (int i = 0; i < 4; ++i) {
                d[dtok(rng)] = vmax;
                d[dtok(rng)] = vmid;
            }
        } else if (kind == 2) {
            for (int64_t i = 0; i < n; ++i) {
                if (dunif(rng) < 0.5f) {
                    d[i] = -INFINITY;
                }
            }
            d[dtok(rng)] = NAN;
        } else if (kind == 3) {
            std::fill(d, d + n, -INFINITY);
            d[dtok(rng)] = scale*dnorm(rng);
        } else if (kind == 4) {
            std::fill(d, d + n, scale);
        } else if (kind == 5) {
            for (int i = 0; i < 3; ++i) {
                d[dtok(rng)] = INFINITY;
            }
        }
    }
}

#ifdef SORTFREE_REF
static void ref_launch(int C, const float * x, const float * u, int32_t * dst, const sortfree_params & p,
        int64_t nrows, cudaStream_t stream) {
    ref::sortfree_params q;
    static_assert(sizeof(q) == sizeof(p), "parameter blocks differ");
    memcpy(&q, &p, sizeof(q));
    switch (C) {
        case  1: ref::sample_sortfree_launch< 1>(x, u, dst, q, nrows, stream); break;
        case  2: ref::sample_sortfree_launch< 2>(x, u, dst, q, nrows, stream); break;
        case  4: ref::sample_sortfree_launch< 4>(x, u, dst, q, nrows, stream); break;
        case  8: ref::sample_sortfree_launch< 8>(x, u, dst, q, nrows, stream); break;
        case 16: ref::sample_sortfree_launch<16>(x, u, dst, q, nrows, stream); break;
        default: abort();
    }
}

// the token of every row from both kernels, for many inputs; returns the number of rows that differ
static int64_t compare_with_ref(int nsm, cudaStream_t stream) {
    const int n_u = GGML_SAMPLE_SORTFREE_N_UNIFORMS;
    const float params[][4] = { // temp, top_k (as float), top_p, min_p
        { 0.8f,   40, 0.9f, 0.05f }, { 1.0f,    1, 1.0f, 0.0f  }, { 0.3f,   40, 0.1f, 0.0f  },
        { 2.0f,   40, 1.0f, 0.05f }, { 1.0f,  500, 0.9f, 0.0f  }, { 1.2f, 5000, 0.95f, 0.01f },
        { 0.8f,    0, 0.9f, 0.05f }, { 1.0f,    0, 1.0f, 0.0f  }, { 0.0f,   40, 0.9f, 0.05f },
        { 1.0f,  513, 0.5f, 0.0f  }, { 0.7f,   64, 0.99f, 0.2f },
    };
    std::mt19937 rng(42);
    std::uniform_real_distribution<float> dunif(0.0f, 1.0f);
    int64_t rows_checked = 0;
    int64_t rows_differ  = 0;
    for (int64_t n : { 7, 1000, 32000, 49152, 151936, 262144 }) {
        for (int64_t nrows : { 1, 3, 8, 64 }) {
            for (bool special : { false, true }) {
                std::vector<float> hx;
                fill_rows(rng, n, nrows, special, hx);
                float * dx;
                float * du;
                int32_t * d0;
                int32_t * d1;
                CUDA_CHECK(cudaMalloc(&dx, hx.size()*sizeof(float)));
                CUDA_CHECK(cudaMalloc(&du, n_u*nrows*sizeof(float)));
                CUDA_CHECK(cudaMalloc(&d0, nrows*sizeof(int32_t)));
                CUDA_CHECK(cudaMalloc(&d1, nrows*sizeof(int32_t)));
                CUDA_CHECK(cudaMemcpy(dx, hx.data(), hx.size()*sizeof(float), cudaMemcpyHostToDevice));
                const int C = pick_cluster(n, nrows, nsm);
                for (const auto & pp : params) {
                    const int top_k = (int) pp[1] > 0 && (int64_t) pp[1] >= n ? (int) n : (int) pp[1];
                    const sortfree_params p = make_params(n, n_u, pp[0], top_k, pp[2], pp[3]);
                    for (int draw = 0; draw < 4; ++draw) {
                        std::vector<float> hu(n_u*nrows);
                        for (float & v : hu) {
                            v = dunif(rng);
                        }
                        CUDA_CHECK(cudaMemcpy(du, hu.data(), hu.size()*sizeof(float), cudaMemcpyHostToDevice));
                        ref_launch(C, dx, du, d0, p, nrows, stream);
                        launch(false, C, dx, du, d1, p, nrows, stream);
                        std::vector<int32_t> t0(nrows);
                        std::vector<int32_t> t1(nrows);
                        CUDA_CHECK(cudaMemcpyAsync(t0.data(), d0, nrows*sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
                        CUDA_CHECK(cudaMemcpyAsync(t1.data(), d1, nrows*sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
                        CUDA_CHECK(cudaStreamSynchronize(stream));
                        for (int64_t r = 0; r < nrows; ++r) {
                            ++rows_checked;
                            if (t0[r] != t1[r]) {
                                if (rows_differ < 20) {
                                    printf("DIFF vocab %lld rows %lld row %lld special %d temp %g k %d p %g minp %g: "
                                           "ref %d new %d\n", (long long) n, (long long) nrows, (long long) r,
                                           (int) special, pp[0], top_k, pp[2], pp[3], t0[r], t1[r]);
                                }
                                ++rows_differ;
                            }
                        }
                    }
                }
                CUDA_CHECK(cudaFree(dx));
                CUDA_CHECK(cudaFree(du));
                CUDA_CHECK(cudaFree(d0));
                CUDA_CHECK(cudaFree(d1));
            }
        }
    }
    printf("compare with %s: %lld of %lld rows differ\n", SORTFREE_REF, (long long) rows_differ, (long long) rows_checked);
    return rows_differ;
}
#endif // SORTFREE_REF

// median microseconds per launch: back to back in a CUDA graph (what a graph of many nodes costs per node) and
// one launch at a time between two events (the latency a decode step sees)
template <typename F>
static void time_launches(F && run, cudaStream_t stream, float & graph_us, float & single_us) {
    const int n_graph = 200;
    // warm up (and set the kernel attributes outside the capture)
    for (int i = 0; i < 10; ++i) {
        run();
    }
    CUDA_CHECK(cudaStreamSynchronize(stream));

    cudaEvent_t e0, e1;
    CUDA_CHECK(cudaEventCreate(&e0));
    CUDA_CHECK(cudaEventCreate(&e1));

    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
    for (int i = 0; i < n_graph; ++i) {
        run();
    }
    CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    CUDA_CHECK(cudaGraphLaunch(exec, stream));
    std::vector<float> tg;
    for (int rep = 0; rep < 5; ++rep) {
        CUDA_CHECK(cudaEventRecord(e0, stream));
        CUDA_CHECK(cudaGraphLaunch(exec, stream));
        CUDA_CHECK(cudaEventRecord(e1, stream));
        CUDA_CHECK(cudaEventSynchronize(e1));
        float ms;
        CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        tg.push_back(1000.0f*ms/n_graph);
    }
    CUDA_CHECK(cudaGraphExecDestroy(exec));
    CUDA_CHECK(cudaGraphDestroy(graph));

    std::vector<float> ts;
    for (int rep = 0; rep < 100; ++rep) {
#ifdef SORTFREE_MARKS
        long long zero[16] = {};
        CUDA_CHECK(cudaMemcpyToSymbolAsync(sortfree_marks, zero, sizeof(zero), 0, cudaMemcpyHostToDevice, stream));
#endif // SORTFREE_MARKS
        CUDA_CHECK(cudaEventRecord(e0, stream));
        run();
        CUDA_CHECK(cudaEventRecord(e1, stream));
        CUDA_CHECK(cudaEventSynchronize(e1));
        float ms;
        CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        ts.push_back(1000.0f*ms);
    }
    CUDA_CHECK(cudaEventDestroy(e0));
    CUDA_CHECK(cudaEventDestroy(e1));
    std::sort(tg.begin(), tg.end());
    std::sort(ts.begin(), ts.end());
    graph_us  = tg[tg.size()/2];
    single_us = ts[ts.size()/2];
}

int main() {
    int nsm;
    CUDA_CHECK(cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, 0));
    cudaStream_t stream;
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
#ifdef SORTFREE_REF
    const int64_t differ = compare_with_ref(nsm, stream);
#endif // SORTFREE_REF

    const variant variants[] = {
        { "empty",     true,  0.8f, 40, 0.9f, 0.05f },
        { "greedy",    false, 0.0f, 40, 0.9f, 0.05f },
        { "topk",      false, 1.0f, 40, 1.0f, 0.0f  },
        { "topk-minp", false, 0.8f, 40, 1.0f, 0.05f },
        { "full",      false, 0.8f, 40, 0.9f, 0.05f },
        { "topp",      false, 0.8f,  0, 0.9f, 0.0f  },
    };
    printf("%-7s %-5s %-3s %-10s %12s %12s", "vocab", "rows", "C", "variant", "graph_us", "single_us");
#ifdef SORTFREE_REF
    printf(" %12s %12s %8s", "ref_graph_us", "ref_single_us", "speedup");
#endif // SORTFREE_REF
    printf("\n");
    for (int64_t n : { 49152, 151936, 262144 }) {
        for (int64_t nrows : { 1, 8, 64 }) {
            const int C = pick_cluster(n, nrows, nsm);
            const int n_u = GGML_SAMPLE_SORTFREE_N_UNIFORMS;

            // the logits of test-backend-ops' perf cases: a gaussian bulk with a few boosted tokens
            std::mt19937 rng(1234);
            std::uniform_real_distribution<float> dunif(0.0f, 1.0f);
            std::vector<float> hx;
            fill_rows(rng, n, nrows, false, hx);
            std::vector<float> hu(n_u*nrows);
            for (float & v : hu) {
                v = dunif(rng);
            }
            float * dx;
            float * du;
            int32_t * dd;
            CUDA_CHECK(cudaMalloc(&dx, hx.size()*sizeof(float)));
            CUDA_CHECK(cudaMalloc(&du, hu.size()*sizeof(float)));
            CUDA_CHECK(cudaMalloc(&dd, nrows*sizeof(int32_t)));
            CUDA_CHECK(cudaMemcpy(dx, hx.data(), hx.size()*sizeof(float), cudaMemcpyHostToDevice));
            CUDA_CHECK(cudaMemcpy(du, hu.data(), hu.size()*sizeof(float), cudaMemcpyHostToDevice));

            for (const variant & v : variants) {
                const sortfree_params p = make_params(n, n_u, v.temp, v.top_k, v.top_p, v.min_p);
                const auto run = [&]() { launch(v.empty, C, dx, du, dd, p, nrows, stream); };
                float graph_us;
                float single_us;
                time_launches(run, stream, graph_us, single_us);
                printf("%-7lld %-5lld %-3d %-10s %12.2f %12.2f", (long long) n, (long long) nrows, C, v.name,
                        graph_us, single_us);
#ifdef SORTFREE_MARKS
                long long marks[16];
                CUDA_CHECK(cudaMemcpyFromSymbol(marks, sortfree_marks, sizeof(marks)));
#endif // SORTFREE_MARKS
#ifdef SORTFREE_REF
                // the reference kernel on the same inputs, in the same process, right after
                if (!v.empty) {
                    float ref_graph_us;
                    float ref_single_us;
                    time_launches([&]() { ref_launch(C, dx, du, dd, p, nrows, stream); }, stream, ref_graph_us, ref_single_us);
                    printf(" %12.2f %12.2f %8.2f", ref_graph_us, ref_single_us, ref_graph_us/graph_us);
                } else {
                    printf(" %12s %12s %8s", "-", "-", "-");
                }
#endif // SORTFREE_REF
#ifdef SORTFREE_MARKS
                printf("  marks (cycles after 0):");
                for (int i = 1; i < 16; ++i) {
                    if (marks[i] != 0 && marks[0] != 0) {
                        printf(" %d:%lld", i, marks[i] - marks[0]);
                    }
                }
#endif // SORTFREE_MARKS
                printf("\n");
                fflush(stdout);
            }
            CUDA_CHECK(cudaFree(dx));
            CUDA_CHECK(cudaFree(du));
            CUDA_CHECK(cudaFree(dd));
        }
    }
#ifdef SORTFREE_REF
    return differ == 0 ? 0 : 1;
#else
    return 0;
#endif // SORTFREE_REF
}

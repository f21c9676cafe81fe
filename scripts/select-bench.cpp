// KV-Compress's slot selection (llama_kv_compress_select) alone, timed on synthetic heads: the number of slots a
// compression ranks on a llama3-8b shape at depth 32768 compressed 4x every 2048 positions (32 layers x 8 KV heads,
// each with its budget of 8192 slots plus the 2048 new ones), on 1 to N threads. Built by scripts/select-bench
// against src/llama-kv-pages.cpp of a tree, so that two trees' selections can be timed side by side on one machine.
//
//   select-bench [THREADS...]      (default 1 2 4 8 16): per thread count the median of 15 runs, in ms

#include "llama-kv-pages.h"

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

// what src/llama-kv-pages.cpp needs from the rest of libllama and ggml
std::string format(const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char buf[1024];
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return buf;
}

void llama_log_internal(ggml_log_level level, const char * fmt, ...) {
    (void) level;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
}

extern "C" void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "%s:%d: abort: %s\n", file, line, fmt);
    abort();
}

int main(int argc, char ** argv) {
    const int n_heads = 32*8;
    const int n_slots = 8192 + 2048;
    const uint32_t budget = 8192;

    std::vector<uint32_t> threads;
    for (int i = 1; i < argc; ++i) {
        threads.push_back((uint32_t) atoi(argv[i]));
    }
    if (threads.empty()) {
        threads = { 1, 2, 4, 8, 16 };
    }

    // scores as attention leaves them: most slots near zero, a few large (a product of uniforms, squared)
    std::mt19937 rng(42);
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    std::vector<llama_kv_compress_head> heads(n_heads);
    for (int i = 0; i < n_heads; ++i) {
        heads[i].group = (uint32_t) (i/8);
        heads[i].pos.resize(n_slots);
        heads[i].score.resize(n_slots);
        for (int j = 0; j < n_slots; ++j) {
            const float s = u(rng)*u(rng);
            heads[i].pos[j]   = j*3 + (int) (u(rng)*3); // kept positions spread over a longer context
            heads[i].score[j] = s*s;
        }
    }

    printf("%d heads x %d slots, budget %u\n", n_heads, n_slots, budget);
    for (uint32_t nth : threads) {
        std::vector<double> ms;
        size_t n_evicted = 0;
        for (int r = 0; r < 15; ++r) {
            std::vector<std::vector<uint8_t>> keep;
            const auto t0 = std::chrono::steady_clock::now();
            n_evicted = llama_kv_compress_select(heads, budget, 32, 0, LLAMA_KV_COMPRESS_VARIABLE, keep, 0, nth, 0);
            const auto t1 = std::chrono::steady_clock::now();
            ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
        }
        std::sort(ms.begin(), ms.end());
        printf("threads %2u: median %7.2f ms (min %7.2f, max %7.2f), %zu evicted\n", nth, ms[ms.size()/2], ms.front(),
            ms.back(), n_evicted);
    }
    return 0;
}

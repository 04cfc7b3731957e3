/* Whether every CUDA stream in a list is idle, asked of the driver in one loop.
 *
 * qbridge.to_jax's default producer="auto" asks each of the streams torch hands out on a device (129 on a
 * CUDA device) whether work is still queued on it. Asked one stream at a time through torch's
 * Stream.query, that costs about 0.4-0.5 us a stream (the Python call, the device guard, the runtime API);
 * here the driver's cuStreamQuery is called for each stream in a loop (about 0.15-0.26 us a stream on an
 * H200 host, benchmarks/RESULTS.md).
 *
 * The caller passes cuStreamQuery's address (from libcuda, which the calling process has loaded), so this
 * file needs no CUDA header or library to build: it is built with the CPU decode (cpu_4bit.c) into one
 * library by torch_side/_native.py.
 */
#include <stdint.h>

typedef int (*qb_stream_query_t)(void *stream); /* CUresult cuStreamQuery(CUstream) */

/* The index of the first of streams[0..n) whose query does not return 0 (CUDA_SUCCESS: nothing queued is
 * unfinished), or -1 when every one does. A busy stream answers 600 (CUDA_ERROR_NOT_READY); any other
 * answer is an error, which the caller reports by asking that stream again through torch. */
int qb_first_busy_stream(qb_stream_query_t query, void *const *streams, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (query(streams[i]) != 0)
            return (int)i;
    return -1;
}

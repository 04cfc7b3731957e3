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

typedef int (*qb_event_record_t)(void *event, void *stream);                         /* cuEventRecord */
typedef int (*qb_stream_wait_event_t)(void *stream, void *event, unsigned int flags); /* cuStreamWaitEvent */

/* qbridge.to_jax's stream work for one tensor handed to JAX, in one call: the scan above over
 * streams[0..n) (n = 0: none), then, when none is busy, `consumer` (JAX's stream for imported buffers) made
 * to wait on the GPU for the work queued so far on `current` (torch's current stream; a null handle is the
 * legacy default stream): `event` recorded on `current`, `consumer` waiting for that record. This is the
 * ordering torch's Tensor.__dlpack__(stream=consumer) makes with an event of its own, without the host
 * waiting. A later record of the same event does not move an earlier wait (CUDA waits for the record made
 * before cuStreamWaitEvent was called), so one event per calling thread serves every call.
 *
 * Returns -1 when `consumer` is ordered after `current` (or is `current`); the index of the first busy
 * stream, with nothing recorded; -2 when cuEventRecord, -3 when cuStreamWaitEvent did not answer 0 (the
 * caller then takes torch's route, which reports the error). */
int qb_order_after_idle(qb_stream_query_t query, void *const *streams, int64_t n, qb_event_record_t record,
                        qb_stream_wait_event_t wait, void *event, void *current, void *consumer) {
    int first = qb_first_busy_stream(query, streams, n);
    if (first >= 0)
        return first;
    if (consumer == current)
        return -1;
    if (record(event, current) != 0)
        return -2;
    if (wait(consumer, event, 0) != 0)
        return -3;
    return -1;
}
